//! The collective operations a data-parallel step needs, behind one trait, and two host
//! implementations: `Solo` (world size 1, nothing to do) and `Threads` (ranks as threads
//! of one process, for the CPU backend and the tests). The TCP implementation between
//! processes is in `tcp.rs`, NCCL's in `cuda/nccl.rs`.
//!
//! Every implementation sums the ranks' values in rank order `0, 1, …, W-1` and then
//! divides by `W`, so every rank receives the same bits and the result does not depend on
//! which rank finished first.

use std::any::Any;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// What the training loop asks of the other ranks.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;

    /// Replaces `values` on every rank by the element-wise mean over the ranks, in fp32,
    /// summed in rank order.
    fn all_reduce_mean(&mut self, values: &mut [f32]) -> Result<()>;

    /// Replaces `bytes` on every rank by rank 0's (every rank passes the same length).
    fn broadcast(&mut self, bytes: &mut [u8]) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// The concrete collective, so a backend can use a faster path for one it knows (the
    /// CUDA backend reduces on the device through NCCL).
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// Device time of the last gradient all-reduce, where the collective runs on a device
    /// and one has finished (it waits for it).
    fn last_all_reduce(&mut self) -> Result<Option<AllReduceTime>> {
        Ok(None)
    }
}

/// Device time of one step's gradient all-reduce.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AllReduceTime {
    /// From the start of its first bucket to the end of its last.
    pub span_ms: f64,
    /// The part after the backward had ended: what overlapping it with the backward did
    /// not hide.
    pub exposed_ms: f64,
}

/// `out = (parts[0] + parts[1] + … ) / W`, element by element in rank order: the one
/// reduction every host implementation uses.
pub fn mean_in_rank_order(parts: &[&[f32]], out: &mut [f32]) {
    let world = parts.len() as f32;
    for (i, o) in out.iter_mut().enumerate() {
        let mut sum = 0.0f32;
        for p in parts {
            sum += p[i];
        }
        *o = sum / world;
    }
}

/// World size 1: every operation is the identity.
#[derive(Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _bytes: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// What the ranks of a [`Threads`] group share.
struct Board {
    /// Each rank's contribution to the operation in progress.
    slots: Vec<Option<Vec<u8>>>,
    /// Ranks arrived at the current barrier, and how many barriers have completed.
    arrived: usize,
    generation: u64,
    /// Set when a rank left the group (its thread ended or failed): the others stop
    /// waiting for it.
    broken: Option<usize>,
}

struct Group {
    board: Mutex<Board>,
    changed: Condvar,
    world: usize,
    timeout: Duration,
}

fn lock(m: &Mutex<Board>) -> MutexGuard<'_, Board> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One rank of a group of threads. Dropping it (its thread finished or failed) makes the
/// others' next wait fail instead of hang.
pub struct Threads {
    group: Arc<Group>,
    rank: usize,
}

impl Threads {
    /// `world` ranks, to be moved one to each thread. A rank that waits longer than
    /// `timeout` for the others fails.
    pub fn group(world: usize, timeout: Duration) -> Vec<Threads> {
        let group = Arc::new(Group {
            board: Mutex::new(Board {
                slots: vec![None; world],
                arrived: 0,
                generation: 0,
                broken: None,
            }),
            changed: Condvar::new(),
            world,
            timeout,
        });
        (0..world)
            .map(|rank| Threads {
                group: group.clone(),
                rank,
            })
            .collect()
    }

    /// Waits until every rank has reached this barrier.
    fn wait_all(&self) -> Result<()> {
        let g = &self.group;
        let deadline = Instant::now() + g.timeout;
        let mut board = lock(&g.board);
        let generation = board.generation;
        board.arrived += 1;
        if board.arrived == g.world {
            board.arrived = 0;
            board.generation += 1;
            g.changed.notify_all();
            return Ok(());
        }
        while board.generation == generation {
            if let Some(gone) = board.broken {
                bail!("rank {gone} left the group; rank {} stops", self.rank);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "rank {}: the other ranks did not arrive within {:?}",
                    self.rank,
                    g.timeout
                );
            }
            board = g
                .changed
                .wait_timeout(board, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Publishes `mine`, waits for everyone's, applies `read` to all slots, and waits
    /// again so no slot is overwritten while another rank still reads it.
    fn exchange(&mut self, mine: Vec<u8>, read: impl FnOnce(&[Option<Vec<u8>>])) -> Result<()> {
        lock(&self.group.board).slots[self.rank] = Some(mine);
        self.wait_all()?;
        read(&lock(&self.group.board).slots);
        self.wait_all()
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        let mut board = lock(&self.group.board);
        board.broken.get_or_insert(self.rank);
        self.group.changed.notify_all();
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }

    fn all_reduce_mean(&mut self, values: &mut [f32]) -> Result<()> {
        let mine = bytemuck::cast_slice(values).to_vec();
        self.exchange(mine, |slots| {
            let parts: Vec<&[f32]> = slots
                .iter()
                .map(|s| bytemuck::cast_slice(s.as_deref().unwrap_or(&[])))
                .collect();
            mean_in_rank_order(&parts, values);
        })
    }

    fn broadcast(&mut self, bytes: &mut [u8]) -> Result<()> {
        let mine = bytes.to_vec();
        self.exchange(mine, |slots| {
            if let Some(root) = &slots[0] {
                bytes.copy_from_slice(root);
            }
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.wait_all()
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_average_in_rank_order_and_broadcast() {
        let ranks = Threads::group(3, Duration::from_secs(10));
        let results: Vec<(Vec<f32>, Vec<u8>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut v = vec![r, 1.0 + r * 1e-8, -r * 3.0];
                        c.all_reduce_mean(&mut v).unwrap();
                        let mut b = vec![c.rank() as u8; 4];
                        c.broadcast(&mut b).unwrap();
                        c.barrier().unwrap();
                        (v, b)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut want = vec![0.0f32; 3];
        let parts: Vec<Vec<f32>> = (0..3)
            .map(|r| vec![r as f32, 1.0 + r as f32 * 1e-8, -(r as f32) * 3.0])
            .collect();
        let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        mean_in_rank_order(&views, &mut want);
        assert_eq!(want, vec![1.0, 1.0, -3.0]);
        for (v, b) in results {
            assert_eq!(v, want);
            assert_eq!(b, vec![0u8; 4]);
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others() {
        let mut ranks = Threads::group(2, Duration::from_secs(30));
        let gone = ranks.pop();
        drop(gone);
        let err = ranks[0].barrier().unwrap_err().to_string();
        assert!(err.contains("rank 1 left"), "{err}");
    }

    #[test]
    fn a_rank_that_never_comes_times_out() {
        let mut ranks = Threads::group(2, Duration::from_millis(50));
        let err = ranks[0]
            .all_reduce_mean(&mut [1.0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not arrive"), "{err}");
    }
}
