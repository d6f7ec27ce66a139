//! The start of a data-parallel run: every rank reaches rank 0 over TCP, shows what it is
//! about to run (its [`Fingerprint`]), and rank 0 answers all of them with one verdict:
//! the session bytes (NCCL's unique id, when the run uses NCCL) or the reason to stop.
//!
//! Rank 0 listens on the launch's port; the others connect, retrying until the timeout,
//! since rank 0 may start later than they do. A rank that never arrives, a rank running
//! another lomar or another config, and a rank that failed before it could train each
//! stop the whole run with a message naming the rank, on every rank that got that far.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::launch::Launch;
use super::tcp::{receive_frame, send_frame, Links};

/// Pause between connection attempts to a rank 0 that is not listening yet.
const RETRY: Duration = Duration::from_millis(200);

/// What a rank is about to run, field by field: the lomar version, every config field
/// (`train.batch`, …) and the run's other choices (data, device, resumed step).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(pub BTreeMap<String, String>);

impl Fingerprint {
    /// This build's version plus `fields` (a serialisable value, flattened to dotted names).
    pub fn new(fields: &impl Serialize) -> Result<Self> {
        let mut map = BTreeMap::new();
        map.insert(
            "lomar version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        );
        flatten("", &serde_json::to_value(fields)?, &mut map);
        Ok(Fingerprint(map))
    }

    /// FNV-1a over the fields, for the run header: equal fingerprints, equal hashes.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (k, v) in &self.0 {
            for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// The first field where `other` (rank `rank`'s) differs from this one (rank 0's).
    pub fn difference(&self, other: &Fingerprint, rank: usize) -> Option<String> {
        let missing = "(absent)".to_string();
        let keys: std::collections::BTreeSet<&String> =
            self.0.keys().chain(other.0.keys()).collect();
        keys.into_iter().find_map(|k| {
            let (mine, theirs) = (
                self.0.get(k).unwrap_or(&missing),
                other.0.get(k).unwrap_or(&missing),
            );
            (mine != theirs).then(|| {
                format!("rank {rank} differs from rank 0 in {k}: {theirs} on rank {rank}, {mine} on rank 0")
            })
        })
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// What a rank sends rank 0: what it will run, or why it cannot.
#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
    run: Result<Fingerprint, String>,
}

/// Rank 0's answer to everyone.
#[derive(Serialize, Deserialize)]
enum Verdict {
    Go { session: Vec<u8> },
    Stop { reason: String },
}

/// The outcome of a rendezvous: rank 0's session bytes and the open links.
pub struct Joined {
    pub session: Vec<u8>,
    pub links: Links,
}

/// Meets the other ranks. `mine` is this rank's fingerprint, or the error that stops it
/// (it still takes part, so the others stop too instead of waiting); `session` makes rank
/// 0's session bytes once every rank is known to agree.
pub fn rendezvous(
    launch: &Launch,
    mine: Result<Fingerprint, String>,
    session: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Joined> {
    if launch.rank == 0 {
        serve(launch, mine, session, timeout)
    } else {
        join(launch, mine, timeout)
    }
}

fn serve(
    launch: &Launch,
    mine: Result<Fingerprint, String>,
    session: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Joined> {
    let listener = TcpListener::bind(("0.0.0.0", launch.port)).with_context(|| {
        format!(
            "rank 0 cannot listen on port {} (set LOMAR_PORT to a free port)",
            launch.port
        )
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<(TcpStream, Result<Fingerprint, String>)>> =
        (1..launch.world).map(|_| None).collect();
    let mut problem: Option<String> = None;
    while peers.iter().any(Option::is_none) && Instant::now() < deadline {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rank 0 cannot accept connections"),
        };
        stream.set_nonblocking(false)?;
        let left = deadline.saturating_duration_since(Instant::now());
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let hello = receive_frame(&mut stream, "a connecting rank")
            .and_then(|b| serde_json::from_slice::<Hello>(&b).context("not a lomar rank"));
        match hello {
            Ok(h) if (1..launch.world).contains(&h.rank) && peers[h.rank - 1].is_none() => {
                peers[h.rank - 1] = Some((stream, h.run));
            }
            Ok(h) => {
                problem.get_or_insert(format!(
                    "two processes claim rank {} (or it is outside 1..{}): check RANK/SLURM_PROCID",
                    h.rank, launch.world
                ));
            }
            Err(e) => eprintln!("warning: rank 0 ignored a connection: {e:#}"),
        }
    }
    let missing: Vec<String> = peers
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_none())
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    let reason = problem.or_else(|| match &mine {
        Err(e) => Some(format!("rank 0 failed: {e}")),
        Ok(own) => peers.iter().enumerate().find_map(|(i, p)| match p {
            Some((_, Err(e))) => Some(format!("rank {} failed: {e}", i + 1)),
            Some((_, Ok(theirs))) => own.difference(theirs, i + 1),
            None => None,
        }),
    });
    let reason = reason.or_else(|| {
        (!missing.is_empty()).then(|| {
            format!(
                "rank(s) {} did not reach rank 0 (port {}) within {timeout:?}",
                missing.join(", "),
                launch.port
            )
        })
    });
    let verdict = match reason {
        Some(reason) => Verdict::Stop { reason },
        None => match session() {
            Ok(session) => Verdict::Go { session },
            Err(e) => Verdict::Stop {
                reason: format!("rank 0 cannot start the session: {e:#}"),
            },
        },
    };
    let bytes = serde_json::to_vec(&verdict)?;
    let mut links = Vec::new();
    for (i, peer) in peers.into_iter().enumerate() {
        if let Some((mut stream, _)) = peer {
            // A rank that already left cannot be told; the others still are.
            let _ = send_frame(&mut stream, &bytes, &format!("rank {}", i + 1));
            links.push(stream);
        }
    }
    match verdict {
        Verdict::Go { session } => Ok(Joined {
            session,
            links: Links::Root(links),
        }),
        Verdict::Stop { reason } => match mine {
            Err(e) => bail!("{e}"),
            Ok(_) => bail!("the run stopped before training: {reason}"),
        },
    }
}

fn join(launch: &Launch, mine: Result<Fingerprint, String>, timeout: Duration) -> Result<Joined> {
    let deadline = Instant::now() + timeout;
    let address = format!("{}:{}", launch.host, launch.port);
    let mut stream = loop {
        let attempt = address
            .to_socket_addrs()
            .map_err(anyhow::Error::from)
            .and_then(|addrs| {
                let mut last = anyhow::anyhow!("{address} resolves to no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, RETRY.max(Duration::from_secs(1))) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e.into(),
                    }
                }
                Err(last)
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() + RETRY >= deadline => bail!(
                "rank {}: rank 0 at {address} was unreachable for {timeout:?} (last attempt: {e:#}); is rank 0 running, and is MASTER_ADDR right?",
                launch.rank
            ),
            Err(_) => std::thread::sleep(RETRY),
        }
    };
    let own_error = mine.as_ref().err().cloned();
    let hello = Hello {
        rank: launch.rank,
        run: mine,
    };
    send_frame(&mut stream, &serde_json::to_vec(&hello)?, "rank 0")?;
    // Rank 0 answers once the slowest rank has arrived, at most its own timeout later.
    stream.set_read_timeout(Some(timeout + Duration::from_secs(5)))?;
    let verdict: Verdict = serde_json::from_slice(&receive_frame(&mut stream, "rank 0")?)
        .context("rank 0's answer is not a lomar verdict")?;
    if let Some(e) = own_error {
        bail!("{e}");
    }
    match verdict {
        Verdict::Go { session } => Ok(Joined {
            session,
            links: Links::Peer {
                rank: launch.rank,
                root: stream,
            },
        }),
        Verdict::Stop { reason } => bail!("the run stopped before training: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_name_the_first_differing_field() {
        let a = Fingerprint::new(&serde_json::json!({"train": {"batch": 4, "seed": 1}})).unwrap();
        let b = Fingerprint::new(&serde_json::json!({"train": {"batch": 8, "seed": 1}})).unwrap();
        assert_eq!(a.difference(&a.clone(), 1), None);
        assert_eq!(a.hash(), a.clone().hash());
        assert_ne!(a.hash(), b.hash());
        let msg = a.difference(&b, 3).unwrap();
        assert_eq!(
            msg,
            "rank 3 differs from rank 0 in train.batch: 8 on rank 3, 4 on rank 0"
        );
    }
}
