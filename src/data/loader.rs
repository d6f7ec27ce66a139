//! The image-folder loader: worker threads decode and augment images ahead of the training
//! step into a bounded reorder queue, and the step takes them in stream order.
//!
//! The stream is fixed by the seed alone: position `k` is file `order(epoch)[k mod N]` of
//! epoch `k / N` (a fresh seeded shuffle per epoch), augmented with draws that depend on
//! `(seed, epoch, file)`. Workers may finish in any order; the consumer waits for position
//! `k` itself, so output never depends on thread timing, and the whole loader state is
//! the counter `k` (plus the files found unusable, kept for the report).
//!
//! A file that cannot be decoded is skipped with one warning line naming it, the first
//! time it is met, and counted; the stream simply moves to the next position.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::augment::{normalise_into, Augment};
use super::decode::Decoder;
use super::folder::ImageFolder;
use super::FolderState;

/// Keeps the shuffle streams apart from the other streams of the same seed.
const SHUFFLE_SALT: u64 = 0x2c8e_55a1_9d04_b7f3;

/// How a loader runs.
#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    /// Output images are `side × side`.
    pub side: usize,
    /// The run's seed: decides the shuffles and the augmentation.
    pub seed: u64,
    /// Decoding threads (at least 1).
    pub threads: usize,
    /// Images decoded ahead of the consumer, at most.
    pub prefetch: usize,
}

/// The seeded per-epoch shuffles of `n` files, the latest two kept (workers straddle at
/// most one epoch boundary, since the queue is far shorter than an epoch or the
/// shuffles are cheap to redo).
struct EpochOrder {
    seed: u64,
    n: usize,
    cache: Mutex<Vec<(u64, Arc<Vec<u32>>)>>,
}

impl EpochOrder {
    fn shuffle(&self, epoch: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ SHUFFLE_SALT);
        rng.set_stream(epoch);
        let mut order: Vec<u32> = (0..self.n as u32).collect();
        for i in (1..self.n).rev() {
            let j = rng.gen_range(0..=i as u32) as usize;
            order.swap(i, j);
        }
        order
    }

    fn epoch(&self, epoch: u64) -> Arc<Vec<u32>> {
        let mut cache = lock(&self.cache);
        if let Some((_, order)) = cache.iter().find(|(e, _)| *e == epoch) {
            return order.clone();
        }
        let order = Arc::new(self.shuffle(epoch));
        if cache.len() == 2 {
            cache.remove(0);
        }
        cache.push((epoch, order.clone()));
        order
    }

    /// (epoch, file index) of stream position `pos`.
    fn locate(&self, pos: u64) -> (u64, usize) {
        let n = self.n as u64;
        let epoch = pos / n;
        (epoch, self.epoch(epoch)[(pos % n) as usize] as usize)
    }
}

/// One position's outcome: the augmented 8-bit image, or why its file was unusable.
type Item = Result<Vec<u8>, String>;

struct Queue {
    /// The next position a worker will take.
    next_job: u64,
    /// Positions below this have been handed to the consumer.
    consumed: u64,
    /// Finished positions waiting for the consumer.
    done: BTreeMap<u64, Item>,
    capacity: u64,
    stop: bool,
}

struct Shared {
    folder: ImageFolder,
    order: EpochOrder,
    augment: Augment,
    queue: Mutex<Queue>,
    /// Image buffers the consumer is done with, for workers to fill again.
    spare: Mutex<Vec<Vec<u8>>>,
    /// Signalled when a position finishes.
    finished: Condvar,
    /// Signalled when the consumer frees room in the queue, or on shutdown.
    room: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Worker code never panics while holding a lock (decoding runs outside it and its
    // panics are caught), so a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn load(&self, pos: u64, decoder: &mut Decoder) -> Item {
        let (epoch, file) = self.order.locate(pos);
        let image = decoder.read(&self.folder.path(file))?;
        let mut out = lock(&self.spare).pop().unwrap_or_default();
        out.resize(self.augment.side * self.augment.side * 3, 0);
        self.augment.apply(&image, epoch, file as u64, &mut out);
        Ok(out)
    }

    fn work(&self) {
        let mut decoder = Decoder::default();
        loop {
            let pos = {
                let mut q = lock(&self.queue);
                loop {
                    if q.stop {
                        return;
                    }
                    if q.next_job < q.consumed + q.capacity {
                        q.next_job += 1;
                        break q.next_job - 1;
                    }
                    q = self.room.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            // A decoder bug on a hostile file must not hang the consumer: it becomes an
            // unusable file like any other.
            let item = panic::catch_unwind(AssertUnwindSafe(|| self.load(pos, &mut decoder)))
                .unwrap_or_else(|_| Err("the decoder crashed on this file".to_string()));
            lock(&self.queue).done.insert(pos, item);
            self.finished.notify_all();
        }
    }
}

/// Decodes and augments a folder's images on worker threads, in a seeded order.
pub struct Loader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// The next stream position to hand out.
    next: u64,
    /// Files found unusable.
    skipped: BTreeSet<usize>,
}

impl Loader {
    /// A loader at stream position `next` (0 for a fresh run) that already knows the
    /// unusable files `skipped` (relative paths, from a checkpoint). Fails when the folder
    /// holds no usable image.
    pub fn open(
        folder: ImageFolder,
        opts: LoaderOptions,
        next: u64,
        skipped: &[String],
    ) -> Result<Loader> {
        if opts.threads == 0 {
            bail!("--loader-threads must be at least 1");
        }
        let known = skipped
            .iter()
            .filter_map(|name| folder.index_of(Path::new(name)))
            .collect();
        let shared = Arc::new(Shared {
            order: EpochOrder {
                seed: opts.seed,
                n: folder.len(),
                cache: Mutex::new(Vec::new()),
            },
            folder,
            augment: Augment {
                seed: opts.seed,
                side: opts.side,
            },
            spare: Mutex::new(Vec::new()),
            queue: Mutex::new(Queue {
                next_job: next,
                consumed: next,
                done: BTreeMap::new(),
                capacity: opts.prefetch.max(1) as u64,
                stop: false,
            }),
            finished: Condvar::new(),
            room: Condvar::new(),
        });
        let mut loader = Loader {
            shared,
            workers: Vec::new(),
            next,
            skipped: known,
        };
        loader.check_usable()?;
        for t in 0..opts.threads {
            let shared = loader.shared.clone();
            let worker = thread::Builder::new()
                .name(format!("lomar-loader-{t}"))
                .spawn(move || shared.work())
                .context("cannot start a loader thread")?;
            loader.workers.push(worker);
        }
        Ok(loader)
    }

    /// Finds one decodable file, in file order, before any training: a folder of
    /// nothing but unusable files is an error now rather than a stall later.
    fn check_usable(&mut self) -> Result<()> {
        let shared = self.shared.clone();
        let folder = &shared.folder;
        let mut unusable: Vec<(usize, String)> = Vec::new();
        let mut decoder = Decoder::default();
        for i in 0..folder.len() {
            if self.skipped.contains(&i) {
                continue;
            }
            match decoder.read(&folder.path(i)) {
                Ok(_) => {
                    for (file, why) in unusable {
                        self.skip(file, &why);
                    }
                    return Ok(());
                }
                Err(why) => unusable.push((i, why)),
            }
        }
        let first = unusable.first().map_or_else(
            || "all were found unusable before".to_string(),
            |(i, why)| format!("{}: {why}", folder.relative(*i).display()),
        );
        bail!(
            "--data {}: no usable image among its {} files (each is unreadable or not a JPEG or PNG; first: {first})",
            folder.root().display(),
            folder.len(),
        )
    }

    fn skip(&mut self, file: usize, why: &str) {
        if self.skipped.insert(file) {
            eprintln!(
                "warning: skipping {}: {why}",
                self.shared.folder.path(file).display()
            );
        }
    }

    /// Files found unusable so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.len() as u64
    }

    /// Files in the folder.
    pub fn files(&self) -> usize {
        self.shared.folder.len()
    }

    /// Decoding threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// The stream position of the next image.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// What a checkpoint stores to continue this exact stream.
    pub fn state(&self) -> FolderState {
        let folder = &self.shared.folder;
        FolderState {
            path: folder.root().to_string_lossy().into_owned(),
            files: folder.len() as u64,
            skipped: self
                .skipped
                .iter()
                .map(|&i| folder.relative(i).to_string_lossy().into_owned())
                .collect(),
        }
    }

    /// The next usable image of the stream, augmented and normalised into `out`
    /// (`[3, side, side]`).
    pub fn next_into(&mut self, out: &mut [f32]) -> Result<()> {
        let files = self.files() as u64;
        let mut failures = 0u64;
        loop {
            let pos = self.next;
            let item = {
                let mut q = lock(&self.shared.queue);
                loop {
                    if let Some(item) = q.done.remove(&pos) {
                        q.consumed = pos + 1;
                        break item;
                    }
                    q = self
                        .shared
                        .finished
                        .wait(q)
                        .unwrap_or_else(|e| e.into_inner());
                }
            };
            self.shared.room.notify_one();
            self.next += 1;
            match item {
                Ok(rgb) => {
                    normalise_into(&rgb, out);
                    lock(&self.shared.spare).push(rgb);
                    return Ok(());
                }
                Err(why) => {
                    let (_, file) = self.shared.order.locate(pos);
                    self.skip(file, &why);
                    failures += 1;
                    if failures >= files {
                        bail!(
                            "--data {}: a whole pass over its {files} files found no readable image (the last: {why}); were the files removed or changed during the run?",
                            self.shared.folder.root().display()
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.room.notify_all();
        for w in self.workers.drain(..) {
            // A worker cannot panic outside the caught decode, so there is nothing to
            // report from a join.
            let _ = w.join();
        }
    }
}

/// The loader's own throughput.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LoaderSpeed {
    pub images: usize,
    pub threads: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    /// CPU time the process spent meanwhile, all threads (Linux only): on a shared
    /// machine, `images / cpu_seconds` is what each free core would add.
    pub cpu_seconds: Option<f64>,
    /// Files found unusable along the way.
    pub skipped: u64,
}

/// CPU time this process's threads have run so far, in seconds, where Linux reports it.
fn process_cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

/// Loads `images` images of `side × side` from the folder at `root` with `threads`
/// decoding threads, as fast as the consumer can take and normalise them, and times it
/// from the start of the threads to the last image (the folder scan and usability check
/// excluded).
pub fn measure(
    root: &Path,
    side: usize,
    threads: usize,
    images: usize,
    seed: u64,
) -> Result<LoaderSpeed> {
    if side == 0 || images == 0 {
        bail!("the loader benchmark needs an image side and an image count of at least 1");
    }
    let folder = ImageFolder::scan(root)?;
    let opts = LoaderOptions {
        side,
        seed,
        threads,
        prefetch: 4 * threads.max(1) + 16,
    };
    let mut loader = Loader::open(folder, opts, 0, &[])?;
    let (started, cpu_started) = (std::time::Instant::now(), process_cpu_seconds());
    let mut tensor = vec![0.0f32; 3 * side * side];
    for _ in 0..images {
        loader.next_into(&mut tensor)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds()
        .zip(cpu_started)
        .map(|(end, start)| end - start);
    Ok(LoaderSpeed {
        images,
        threads,
        seconds,
        images_per_s: images as f64 / seconds,
        cpu_seconds,
        skipped: loader.skipped(),
    })
}
