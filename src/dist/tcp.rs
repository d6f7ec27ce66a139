//! The TCP links rank 0 keeps with every other rank after the rendezvous: framed messages,
//! and a [`Collective`] over them for backends without NCCL (the CPU across processes).
//!
//! The collective is a star: each rank sends its values to rank 0, which sums them in rank
//! order, divides, and sends the mean back. Every read has the run's timeout, so a rank
//! that hangs makes the others fail after it, and one that dies (its connection closes)
//! makes them fail at once.

use std::any::Any;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::collective::{mean_in_rank_order, Collective};

/// Largest frame accepted: a corrupt length must not allocate without bound.
const MAX_FRAME: u64 = 1 << 34;

/// Writes one frame: its length (u64, little-endian), then the bytes.
pub fn send_frame(stream: &mut TcpStream, bytes: &[u8], peer: &str) -> Result<()> {
    stream
        .write_all(&(bytes.len() as u64).to_le_bytes())
        .and_then(|_| stream.write_all(bytes))
        .and_then(|_| stream.flush())
        .with_context(|| format!("cannot send to {peer}"))
}

/// Reads one frame, naming `peer` and the wait in errors.
pub fn receive_frame(stream: &mut TcpStream, peer: &str) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    read_exact(stream, &mut len, peer)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        bail!("{peer} sent a message of {len} bytes: not a lomar peer, or a corrupt stream");
    }
    let mut bytes = vec![0u8; len as usize];
    read_exact(stream, &mut bytes, peer)?;
    Ok(bytes)
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8], peer: &str) -> Result<()> {
    stream.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            anyhow::anyhow!("{peer} closed its connection (it stopped or failed)")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            let wait = stream.read_timeout().ok().flatten().unwrap_or_default();
            anyhow::anyhow!("{peer} sent nothing for {wait:?}: it hangs or is gone")
        }
        _ => anyhow::anyhow!("cannot read from {peer}: {e}"),
    })
}

/// Little-endian f32s back from bytes (a frame need not be aligned for f32).
fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Rank 0's links to ranks `1..W` (index `r - 1`), or another rank's link to rank 0.
pub enum Links {
    Root(Vec<TcpStream>),
    Peer { rank: usize, root: TcpStream },
}

/// The star collective over the rendezvous links.
pub struct TcpCollective {
    links: Links,
    world: usize,
}

impl TcpCollective {
    /// Every read on the links fails after `timeout`.
    pub fn new(links: Links, world: usize, timeout: Duration) -> Result<Self> {
        let streams: Vec<&TcpStream> = match &links {
            Links::Root(peers) => peers.iter().collect(),
            Links::Peer { root, .. } => vec![root],
        };
        for s in streams {
            s.set_read_timeout(Some(timeout))?;
            s.set_nodelay(true)?;
        }
        Ok(TcpCollective { links, world })
    }

    /// Rank 0 gathers every rank's frame in rank order, `combine`s them with its own, and
    /// sends the result back; another rank sends its frame and receives the result.
    fn exchange(
        &mut self,
        mine: &[u8],
        combine: impl FnOnce(&[Vec<u8>]) -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        match &mut self.links {
            Links::Root(peers) => {
                let mut all = vec![mine.to_vec()];
                for (i, s) in peers.iter_mut().enumerate() {
                    all.push(receive_frame(s, &format!("rank {}", i + 1))?);
                }
                let out = combine(&all);
                for (i, s) in peers.iter_mut().enumerate() {
                    send_frame(s, &out, &format!("rank {}", i + 1))?;
                }
                Ok(out)
            }
            Links::Peer { root, .. } => {
                send_frame(root, mine, "rank 0")?;
                receive_frame(root, "rank 0")
            }
        }
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        match self.links {
            Links::Root(_) => 0,
            Links::Peer { rank, .. } => rank,
        }
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, values: &mut [f32]) -> Result<()> {
        let n = values.len();
        let out = self.exchange(bytemuck::cast_slice(values), |all| {
            let parts: Vec<Vec<f32>> = all.iter().map(|b| floats(b)).collect();
            let mut mean = vec![0.0f32; n];
            if parts.iter().all(|p| p.len() == n) {
                let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
                mean_in_rank_order(&views, &mut mean);
                bytemuck::cast_slice(&mean).to_vec()
            } else {
                Vec::new()
            }
        })?;
        if out.len() != 4 * n {
            bail!(
                "the ranks' gradient buffers differ in length: are they training the same model?"
            );
        }
        values.copy_from_slice(&floats(&out));
        Ok(())
    }

    fn broadcast(&mut self, bytes: &mut [u8]) -> Result<()> {
        let out = self.exchange(bytes, |all| all[0].clone())?;
        if out.len() != bytes.len() {
            bail!(
                "broadcast of {} bytes, rank 0 sent {}",
                bytes.len(),
                out.len()
            );
        }
        bytes.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.exchange(&[], |_| Vec::new()).map(|_| ())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
