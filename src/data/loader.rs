//! The image loader: worker threads decode and augment images ahead of the training step
//! into a bounded reorder queue, and the step takes them in stream order.
//!
//! What is read is a [`Source`]: an image folder, or a folder of shards (`shards`). The
//! stream is fixed by the seed alone: position `k` is item `order(epoch)[k mod N]` of
//! epoch `k / N` (each source's seeded order per epoch), augmented with draws that depend
//! on `(seed, epoch, item)`. Workers may finish in any order; the consumer waits for
//! position `k` itself, so output never depends on thread timing or the thread count, and
//! the whole loader state is the counter `k` (plus the items found unusable, kept for the
//! report).
//!
//! An item that cannot be decoded is skipped with one warning line naming it, the first
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

use super::augment::{planar_into, Augment};
use super::decode::Decoder;
use super::folder::ImageFolder;

/// Keeps the folder shuffle streams apart from the other streams of the same seed.
const SHUFFLE_SALT: u64 = 0x2c8e_55a1_9d04_b7f3;

/// A data set the loader streams: items numbered by `u64` ids (the id keys the
/// augmentation draws), visited once per epoch in an order drawn from the seed.
pub trait Source: Send + Sync + 'static {
    /// Stream positions per epoch (at least 1).
    fn epoch_len(&self) -> usize;
    /// Epoch `epoch`'s item ids in stream order: `epoch_len` ids, each once.
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u64>;
    /// The `k`-th item (`k < epoch_len`) in storage order, the order in which the loader
    /// looks for a first usable item.
    fn item(&self, k: usize) -> u64;
    /// Item `item` decoded, cropped, resized and flipped as `augment` draws for `epoch`,
    /// into `out` (`[side, side, 3]`). Err says why the item is unusable.
    fn load(
        &self,
        item: u64,
        epoch: u64,
        augment: &Augment,
        decoder: &mut Decoder,
        out: &mut [u8],
    ) -> Result<(), String>;
    /// The item as a warning names it.
    fn name(&self, item: u64) -> String;
    /// The item as a checkpoint lists it, and back.
    fn key(&self, item: u64) -> String;
    fn item_of(&self, key: &str) -> Option<u64>;
    /// The folder `--data` named.
    fn root(&self) -> &Path;
    /// What an item is called in messages ("files", "samples").
    fn unit(&self) -> &'static str;
}

/// Fisher–Yates from the end, `j = U(0 ..= i)` on u32 draws (docs/DESIGN.md §1.1).
pub fn shuffle<T>(rng: &mut ChaCha8Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = rng.gen_range(0..=i as u32) as usize;
        items.swap(i, j);
    }
}

impl Source for ImageFolder {
    fn epoch_len(&self) -> usize {
        self.len()
    }

    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SHUFFLE_SALT);
        rng.set_stream(epoch);
        let mut order: Vec<u64> = (0..self.len() as u64).collect();
        shuffle(&mut rng, &mut order);
        order
    }

    fn item(&self, k: usize) -> u64 {
        k as u64
    }

    fn load(
        &self,
        item: u64,
        epoch: u64,
        augment: &Augment,
        decoder: &mut Decoder,
        out: &mut [u8],
    ) -> Result<(), String> {
        let image = decoder.read(&self.path(item as usize))?;
        augment.apply(&image, epoch, item, out);
        Ok(())
    }

    fn name(&self, item: u64) -> String {
        self.path(item as usize).display().to_string()
    }

    fn key(&self, item: u64) -> String {
        self.relative(item as usize).to_string_lossy().into_owned()
    }

    fn item_of(&self, key: &str) -> Option<u64> {
        self.index_of(Path::new(key)).map(|i| i as u64)
    }

    fn root(&self) -> &Path {
        ImageFolder::root(self)
    }

    fn unit(&self) -> &'static str {
        "files"
    }
}

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

/// Which stream positions a loader reads. A data-parallel run cuts the one global stream
/// into blocks of `world * block` positions (one global micro-batch each), and rank `rank`
/// reads the `rank`-th `block` positions of every one: together the ranks read exactly
/// the positions a single process would, each once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocks {
    pub rank: usize,
    pub world: usize,
    pub block: usize,
}

impl Blocks {
    /// Every position: a single process.
    pub fn whole() -> Self {
        Blocks {
            rank: 0,
            world: 1,
            block: 1,
        }
    }

    /// The global stream position of this reader's `j`-th read, from global `start`.
    fn global(&self, start: u64, j: u64) -> u64 {
        let (world, block) = (self.world as u64, self.block as u64);
        start + (j / block) * world * block + self.rank as u64 * block + j % block
    }

    /// Where the global stream stands after this reader's first `j` reads: the same on
    /// every rank when all have read whole blocks.
    fn position(&self, start: u64, j: u64) -> u64 {
        let (world, block) = (self.world as u64, self.block as u64);
        start + (j / block) * world * block + j % block
    }
}

/// The source's per-epoch orders, the latest two kept (workers straddle at most one
/// epoch boundary, since the queue is far shorter than an epoch or the orders are cheap
/// to redo).
struct EpochOrder {
    seed: u64,
    n: usize,
    cache: Mutex<Vec<(u64, Arc<Vec<u64>>)>>,
}

impl EpochOrder {
    fn epoch(&self, source: &dyn Source, epoch: u64) -> Arc<Vec<u64>> {
        let mut cache = lock(&self.cache);
        if let Some((_, order)) = cache.iter().find(|(e, _)| *e == epoch) {
            return order.clone();
        }
        let order = Arc::new(source.epoch_order(self.seed, epoch));
        if cache.len() == 2 {
            cache.remove(0);
        }
        cache.push((epoch, order.clone()));
        order
    }

    /// (epoch, item) of stream position `pos`.
    fn locate(&self, source: &dyn Source, pos: u64) -> (u64, u64) {
        let n = self.n as u64;
        let epoch = pos / n;
        (epoch, self.epoch(source, epoch)[(pos % n) as usize])
    }
}

/// One position's outcome: the augmented 8-bit image, or why its item was unusable.
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
    source: Arc<dyn Source>,
    order: EpochOrder,
    /// This reader's positions: its read `j` is global position `blocks.global(start, j)`.
    blocks: Blocks,
    start: u64,
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
    /// (epoch, item) of this reader's `j`-th read.
    fn locate(&self, j: u64) -> (u64, u64) {
        let pos = self.blocks.global(self.start, j);
        self.order.locate(self.source.as_ref(), pos)
    }

    fn load(&self, pos: u64, decoder: &mut Decoder) -> Item {
        let (epoch, item) = self.locate(pos);
        let mut out = lock(&self.spare).pop().unwrap_or_default();
        out.resize(self.augment.side * self.augment.side * 3, 0);
        self.source
            .load(item, epoch, &self.augment, decoder, &mut out)?;
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

/// Decodes and augments a source's images on worker threads, in a seeded order.
pub struct Loader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// This reader's reads handed out so far (see [`Blocks`]).
    next: u64,
    /// Items found unusable.
    skipped: BTreeSet<u64>,
}

impl Loader {
    /// A loader at stream position `next` (0 for a fresh run) that already knows the
    /// unusable items `skipped` (their keys, from a checkpoint). Fails when the source
    /// holds no usable image.
    pub fn open(
        source: Arc<dyn Source>,
        opts: LoaderOptions,
        next: u64,
        skipped: &[String],
    ) -> Result<Loader> {
        Self::open_blocks(source, opts, next, skipped, Blocks::whole())
    }

    /// [`Loader::open`] for one rank's `blocks` of the stream, from global position `next`.
    pub fn open_blocks(
        source: Arc<dyn Source>,
        opts: LoaderOptions,
        next: u64,
        skipped: &[String],
        blocks: Blocks,
    ) -> Result<Loader> {
        if blocks.world == 0 || blocks.block == 0 || blocks.rank >= blocks.world {
            bail!("internal: loader blocks {blocks:?} are empty or the rank is outside the world");
        }
        if opts.threads == 0 {
            bail!("--loader-threads must be at least 1");
        }
        let known = skipped
            .iter()
            .filter_map(|key| source.item_of(key))
            .collect();
        let shared = Arc::new(Shared {
            order: EpochOrder {
                seed: opts.seed,
                n: source.epoch_len(),
                cache: Mutex::new(Vec::new()),
            },
            source,
            blocks,
            start: next,
            augment: Augment {
                seed: opts.seed,
                side: opts.side,
            },
            spare: Mutex::new(Vec::new()),
            queue: Mutex::new(Queue {
                next_job: 0,
                consumed: 0,
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
            next: 0,
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

    /// Finds one usable item, in storage order, before any training: a source of
    /// nothing but unusable items is an error now rather than a stall later.
    fn check_usable(&mut self) -> Result<()> {
        let shared = self.shared.clone();
        let source = shared.source.as_ref();
        let mut unusable: Vec<(u64, String)> = Vec::new();
        let mut decoder = Decoder::default();
        let mut out = vec![0u8; shared.augment.side * shared.augment.side * 3];
        for k in 0..source.epoch_len() {
            let item = source.item(k);
            if self.skipped.contains(&item) {
                continue;
            }
            match source.load(item, 0, &shared.augment, &mut decoder, &mut out) {
                Ok(()) => {
                    for (item, why) in unusable {
                        self.skip(item, &why);
                    }
                    return Ok(());
                }
                Err(why) => unusable.push((item, why)),
            }
        }
        let first = unusable.first().map_or_else(
            || "all were found unusable before".to_string(),
            |(item, why)| format!("{}: {why}", source.key(*item)),
        );
        bail!(
            "--data {}: no usable image among its {} {} (each is unreadable or not a JPEG or PNG; first: {first})",
            source.root().display(),
            source.epoch_len(),
            source.unit(),
        )
    }

    fn skip(&mut self, item: u64, why: &str) {
        if self.skipped.insert(item) {
            eprintln!("warning: skipping {}: {why}", self.shared.source.name(item));
        }
    }

    /// Items found unusable so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.len() as u64
    }

    /// The unusable items' keys, as a checkpoint lists them.
    pub fn skipped_keys(&self) -> Vec<String> {
        let source = &self.shared.source;
        self.skipped.iter().map(|&i| source.key(i)).collect()
    }

    /// Stream positions per epoch: the folder's files, or this rank's share of samples.
    pub fn epoch_len(&self) -> usize {
        self.shared.source.epoch_len()
    }

    /// Decoding threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// The global stream position of the next image.
    pub fn position(&self) -> u64 {
        self.shared.blocks.position(self.shared.start, self.next)
    }

    /// The next usable image of the stream, augmented, into `out` as 8-bit colours
    /// (`[3, side, side]`).
    pub fn next_into(&mut self, out: &mut [u8]) -> Result<()> {
        let items = self.epoch_len() as u64;
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
                    planar_into(&rgb, out);
                    lock(&self.shared.spare).push(rgb);
                    return Ok(());
                }
                Err(why) => {
                    let (_, item) = self.shared.locate(pos);
                    self.skip(item, &why);
                    failures += 1;
                    if failures >= items {
                        let source = &self.shared.source;
                        bail!(
                            "--data {}: a whole pass over its {items} {} found no readable image (the last: {why}); were the files removed or changed during the run?",
                            source.root().display(),
                            source.unit()
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
    /// Items found unusable along the way.
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

/// Loads `images` images of `side × side` from `source` with `threads` decoding
/// threads, as fast as the consumer can take them, and times it from the
/// start of the threads to the last image (opening the source and the usability check
/// excluded).
pub fn measure(
    source: Arc<dyn Source>,
    side: usize,
    threads: usize,
    images: usize,
    seed: u64,
) -> Result<LoaderSpeed> {
    if side == 0 || images == 0 {
        bail!("the loader benchmark needs an image side and an image count of at least 1");
    }
    let opts = LoaderOptions {
        side,
        seed,
        threads,
        prefetch: 4 * threads.max(1) + 16,
    };
    let mut loader = Loader::open(source, opts, 0, &[])?;
    let (started, cpu_started) = (std::time::Instant::now(), process_cpu_seconds());
    let mut tensor = vec![0u8; 3 * side * side];
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
