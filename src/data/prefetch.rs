//! On a GPU the next micro-batch is prepared on a worker thread while the backend runs the
//! current one: the host would otherwise render or copy a batch's images (154 MB at 224
//! pixels and batch 256) while the device waits. A backend that computes on the host's own
//! cores gets its batches drawn in line instead (`Backend::computes_on_host`).
//!
//! The worker runs one batch ahead and makes exactly as many batches as the run will
//! consume, so an image folder's loader never reads (or warns about) files past the last
//! step. Each batch carries the source's state after it, which is what a checkpoint taken
//! after consuming it must record: the run resumes exactly as without the worker.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

use super::{BatchSource, DataState};
use crate::data::batch::Batch;
use crate::data::sampler::SamplerState;

/// A batch and where the source stood right after drawing it.
pub struct Prepared {
    pub batch: Batch,
    pub sampler: SamplerState,
    pub data: DataState,
}

/// A worker thread that makes values one ahead of the consumer.
pub struct Prefetcher<T> {
    receiver: Option<Receiver<Result<T>>>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts making `count` values with `make`; the first error is the last value.
    pub fn start(count: u64, mut make: impl FnMut() -> Result<T> + Send + 'static) -> Result<Self> {
        // A rendezvous channel: the worker hands over a value only when it is asked for,
        // so one value waits while the current one is used, and no more.
        let (sender, receiver) = sync_channel(0);
        let worker = std::thread::Builder::new()
            .name("lomar-batches".into())
            .spawn(move || {
                for _ in 0..count {
                    let value = make();
                    let failed = value.is_err();
                    if sender.send(value).is_err() || failed {
                        return;
                    }
                }
            })
            .context("cannot start the batch-preparing thread")?;
        Ok(Prefetcher {
            receiver: Some(receiver),
            worker: Some(worker),
        })
    }

    /// The next value, waiting for it if it is not ready.
    pub fn receive(&mut self) -> Result<T> {
        let receiver = self.receiver.as_ref().ok_or_else(no_worker)?;
        receiver.recv().map_err(|_| no_worker())?
    }
}

/// The training loop's batches: drawn when asked for, or prepared one ahead.
pub enum Batches {
    InLine {
        source: Box<BatchSource>,
        images: usize,
    },
    Ahead(Prefetcher<Prepared>),
}

impl Batches {
    /// `count` batches of `images` images from `source`, prepared on a worker when `ahead`.
    pub fn new(mut source: BatchSource, images: usize, count: u64, ahead: bool) -> Result<Self> {
        Ok(if ahead {
            Batches::Ahead(Prefetcher::start(count, move || {
                prepare(&mut source, images)
            })?)
        } else {
            Batches::InLine {
                source: Box::new(source),
                images,
            }
        })
    }

    /// The next batch.
    pub fn draw(&mut self) -> Result<Prepared> {
        match self {
            Batches::InLine { source, images } => prepare(source, *images),
            Batches::Ahead(prefetcher) => prefetcher.receive(),
        }
    }
}

/// The next batch of `source` with the state it leaves the source in.
fn prepare(source: &mut BatchSource, images: usize) -> Result<Prepared> {
    let batch = source.next_batch(images)?;
    Ok(Prepared {
        batch,
        sampler: source.sampler_state(),
        data: source.data_state(),
    })
}

fn no_worker() -> anyhow::Error {
    anyhow!("internal: the batch-preparing thread has stopped (its batches were all taken, or it failed)")
}

impl<T> Drop for Prefetcher<T> {
    /// Closing the channel makes the worker stop after the batch it is preparing.
    fn drop(&mut self) {
        self.receiver = None;
        if let Some(worker) = self.worker.take() {
            // A worker that panicked has already reported it; nothing is left to clean up.
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    #[test]
    fn batches_and_states_match_the_source_drawn_directly() {
        let m = preset("tiny").unwrap();
        let mut direct = BatchSource::new(&m, 7);
        let mut in_line = Batches::new(BatchSource::new(&m, 7), 3, 4, false).unwrap();
        let mut ahead = Batches::new(BatchSource::new(&m, 7), 3, 4, true).unwrap();
        for _ in 0..4 {
            let want = direct.next_batch(3).unwrap();
            for got in [in_line.draw().unwrap(), ahead.draw().unwrap()] {
                assert_eq!(got.batch, want);
                assert_eq!(got.sampler, direct.sampler_state());
                assert_eq!(got.data, direct.data_state());
                assert_eq!(got.data.skipped_files(), None);
            }
        }
        // Asking for more than the count is an error, not a hang.
        let err = ahead.draw().err().unwrap().to_string();
        assert!(err.contains("has stopped"), "{err}");
    }

    #[test]
    fn an_error_is_handed_over_in_its_place_and_ends_the_stream() {
        let mut made = 0;
        let mut ahead = Prefetcher::start(5, move || {
            made += 1;
            match made {
                2 => Err(anyhow!("image 2 is unreadable")),
                n => Ok(n),
            }
        })
        .unwrap();
        assert_eq!(ahead.receive().unwrap(), 1);
        let err = ahead.receive().err().unwrap().to_string();
        assert_eq!(err, "image 2 is unreadable");
        let err = ahead.receive().err().unwrap().to_string();
        assert!(err.contains("has stopped"), "{err}");
    }

    #[test]
    fn dropping_it_early_stops_the_worker() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{mpsc, Arc};
        use std::time::Duration;

        let made = Arc::new(AtomicU64::new(0));
        let counter = made.clone();
        let mut ahead =
            Prefetcher::start(u64::MAX, move || Ok(counter.fetch_add(1, Ordering::SeqCst)))
                .unwrap();
        assert_eq!(ahead.receive().unwrap(), 0);
        // Dropped on another thread, so a worker that never stops fails the test after the
        // timeout instead of hanging it.
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            drop(ahead);
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("dropping the prefetcher did not stop its worker");
        // The value taken, and the one waiting in the channel when it closed.
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }
}
