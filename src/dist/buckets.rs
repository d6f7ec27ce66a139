//! The gradient buffer cut into all-reduce buckets in the order the backward finishes it,
//! so that a data-parallel step averages each bucket while the backward of the blocks
//! below it still runs (docs/DESIGN.md, "Data parallel").
//!
//! The backward reports its progress as *ready points*: after each unit (the head, one
//! block, an embedding) it says "every gradient at offset `from` or above is final". That
//! is a suffix of the flat buffer because [`ParamLayout`] orders the tensors as the
//! forward uses them and each unit's tensors are contiguous: the backward, running the
//! forward in reverse, finishes the buffer from its end towards offset 0. The one
//! gradient written outside its own unit, a block's fc2 bias (on the GPU the unit above
//! adds it, on the CPU the block itself), lies at the end of its block, so "from the
//! block's first tensor on" holds on both after the block's own backward.
//!
//! A bucket is a range of the buffer, due at the first point at or below its start.
//! Consecutive units are merged while a bucket stays within the size limit; a unit larger
//! than the limit is cut into pieces of the limit, all due at its point.

use std::ops::Range;

use anyhow::{bail, Result};

use super::Collective;
use crate::params::{ModelRanges, ParamLayout};

/// Values per bucket on the GPU: 32 MiB of fp32, large enough that NCCL reaches its
/// bandwidth, small enough to hand over while later buckets are still being computed.
pub const BUCKET: usize = 8 << 20;

/// Values per bucket of a host collective (the CPU backend: threads or TCP). Its
/// all-reduce blocks the one thread that also runs the backward, so nothing overlaps;
/// small buckets make even the test models run several, so the proofs of the CPU backend
/// go through the schedule, at one round trip through rank 0 per bucket between
/// processes (about 5,000 per ViT-B step, small beside a CPU step of that model).
pub const HOST_BUCKET: usize = 1 << 14;

/// The ready points of a model's backward, in the order it reaches them (decreasing
/// offsets, the last one 0). The backward of each backend reports exactly these.
pub fn ready_points(r: &ModelRanges) -> Vec<usize> {
    let blocks = |b: &[crate::params::BlockRanges]| -> Vec<usize> {
        b.iter().rev().map(|b| b.norm1_w.start).collect()
    };
    let mut points = Vec::new();
    match &r.decoder {
        // head + final norm, blocks from the last, the embedding.
        None => points.push(r.norm_w.start),
        // decoder_pred + decoder_norm, decoder blocks from the last, then decoder_embed,
        // the mask token and the encoder's final norm together.
        Some(d) => {
            points.push(d.norm_w.start);
            points.extend(blocks(&d.blocks));
            points.push(r.norm_w.start);
        }
    }
    points.extend(blocks(&r.blocks));
    points.push(r.patch_w.start);
    points
}

/// The buckets of one model, in the order they become final.
#[derive(Clone, Debug)]
pub struct BucketPlan {
    buckets: Vec<Range<usize>>,
    points: Vec<usize>,
}

impl BucketPlan {
    /// Buckets of at most `limit` values over `layout`'s gradient buffer.
    pub fn new(layout: &ParamLayout, limit: usize) -> BucketPlan {
        let limit = limit.max(1);
        let points = ready_points(layout.ranges());
        let mut buckets = Vec::new();
        // The bucket being filled: [start, end), final at the last point seen.
        let (mut start, mut end) = (layout.total(), layout.total());
        for &point in &points {
            if end > start && end - point > limit {
                buckets.push(start..end);
                end = start;
            }
            start = point;
            while end - start > limit {
                buckets.push(end - limit..end);
                end -= limit;
            }
        }
        if end > start {
            buckets.push(start..end);
        }
        BucketPlan { buckets, points }
    }

    /// The buckets, in the order the backward finishes them (decreasing offsets).
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// The ready points the backward reports, in order.
    pub fn points(&self) -> &[usize] {
        &self.points
    }

    /// A fresh pass over the buckets, for one step's last micro-batch.
    pub fn schedule(&self) -> Schedule<'_> {
        Schedule {
            plan: self,
            next: 0,
        }
    }
}

/// Which buckets one backward has handed out so far.
pub struct Schedule<'p> {
    plan: &'p BucketPlan,
    next: usize,
}

impl<'p> Schedule<'p> {
    /// The buckets that become due when the backward reports that every gradient from
    /// `from` on is final, in order; each bucket is handed out once.
    pub fn due(&mut self, from: usize) -> &'p [Range<usize>] {
        let first = self.next;
        let buckets = self.plan.buckets();
        while buckets.get(self.next).is_some_and(|b| b.start >= from) {
            self.next += 1;
        }
        &buckets[first..self.next]
    }

    /// Errors unless every bucket was handed out: a backward that missed its last point.
    pub fn finish(&self) -> Result<()> {
        if let Some(b) = self.plan.buckets().get(self.next) {
            bail!(
                "the backward ended before gradients {b:?} were reported final ({} of {} buckets averaged)",
                self.next,
                self.plan.buckets().len()
            );
        }
        Ok(())
    }
}

/// Averages each bucket over a host collective as soon as the backward reports it final:
/// the CPU backend's hook. The backward cannot fail, so the first error is kept, later
/// points do nothing, and [`HostBuckets::finish`] returns it.
pub struct HostBuckets<'a> {
    schedule: Schedule<'a>,
    comm: &'a mut dyn Collective,
    failed: Option<anyhow::Error>,
}

impl<'a> HostBuckets<'a> {
    pub fn new(plan: &'a BucketPlan, comm: &'a mut dyn Collective) -> Self {
        HostBuckets {
            schedule: plan.schedule(),
            comm,
            failed: None,
        }
    }

    /// The backward's hook: every gradient of `grads` from `from` on is final.
    pub fn ready(&mut self, from: usize, grads: &mut [f32]) {
        if self.failed.is_some() {
            return;
        }
        for bucket in self.schedule.due(from) {
            if let Err(e) = self.comm.all_reduce_mean(&mut grads[bucket.clone()]) {
                self.failed = Some(e.context(format!("averaging gradients {bucket:?}")));
                return;
            }
        }
    }

    /// The first failure, or an error unless every bucket was averaged.
    pub fn finish(self) -> Result<()> {
        match self.failed {
            Some(e) => Err(e),
            None => self.schedule.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{mae_recipe, preset, Method, PRESETS};
    use crate::cpu::mae::Workspace as MaeWorkspace;
    use crate::cpu::model::Workspace as LomarWorkspace;
    use crate::cpu::step::Step;
    use crate::data::{BatchSource, DataArgs};

    fn layouts() -> Vec<(&'static str, ParamLayout)> {
        PRESETS
            .iter()
            .map(|&name| (name, ParamLayout::new(&preset(name).unwrap())))
            .collect()
    }

    /// Each unit between two points is whole tensors, and the points walk the buffer
    /// from its end to 0.
    #[test]
    fn ready_points_fall_on_tensor_starts_in_decreasing_order() {
        for (name, layout) in layouts() {
            let points = ready_points(layout.ranges());
            let starts: Vec<usize> = layout.entries().iter().map(|e| e.offset).collect();
            assert_eq!(points.last(), Some(&0), "{name}");
            for w in points.windows(2) {
                assert!(w[0] > w[1], "{name}: {points:?}");
            }
            for p in &points {
                assert!(starts.contains(p), "{name}: {p} starts no tensor");
            }
            let m = preset(name).unwrap();
            let depth = m.depth + m.decoder.map_or(0, |d| d.depth + 1);
            assert_eq!(points.len(), depth + 2, "{name}");
        }
    }

    /// The buckets cover the buffer exactly once, from the end down, each within the
    /// limit, each starting at a ready point (or a limit-sized piece of one unit), and no
    /// two neighbours would have fit in one: they are as large as the points allow.
    /// Checked at the GPU's size and at sizes that cut blocks.
    #[test]
    fn buckets_partition_the_buffer_in_backward_order_within_the_limit() {
        for (name, layout) in layouts() {
            let unit = layout.ranges().blocks[0].fc1_w.len();
            for limit in [BUCKET, HOST_BUCKET, unit / 3, 3 * unit] {
                let plan = BucketPlan::new(&layout, limit);
                let b = plan.buckets();
                assert_eq!(b[0].end, layout.total(), "{name} {limit}");
                assert_eq!(b.last().unwrap().start, 0, "{name} {limit}");
                for w in b.windows(2) {
                    assert_eq!(w[0].start, w[1].end, "{name} {limit}: {b:?}");
                    assert!(w[0].len() + w[1].len() > limit, "{name} {limit}: {b:?}");
                }
                for x in b {
                    assert!(!x.is_empty() && x.len() <= limit, "{name} {limit}: {x:?}");
                    // Cut between points only as a piece of one unit over the limit.
                    let inside = |p: &usize| x.start < *p && *p < x.end;
                    let points = plan.points();
                    assert!(
                        points.contains(&x.start)
                            || (x.len() == limit && !points.iter().any(inside)),
                        "{name} {limit}: {x:?} is cut off its points {points:?}"
                    );
                }
            }
        }
    }

    /// ViT-B at the GPU's size: a block (7.1 M values) per bucket, the head merged into
    /// the last block's.
    #[test]
    fn vit_base_gets_a_bucket_per_block() {
        let layout = ParamLayout::new(&preset("vit_base").unwrap());
        let plan = BucketPlan::new(&layout, BUCKET);
        let r = layout.ranges();
        assert_eq!(plan.buckets().len(), 12);
        assert_eq!(
            plan.buckets()[0],
            r.blocks[11].norm1_w.start..layout.total()
        );
        assert_eq!(plan.buckets()[11], 0..r.blocks[1].norm1_w.start);
    }

    /// The CPU backward of each method reports exactly the plan's points, in order, and
    /// at each one every gradient from the point on already has its final value while
    /// every gradient below it has not been touched yet. The buffer starts non-zero, as
    /// in the last micro-batch of an accumulated step.
    #[test]
    fn the_cpu_backward_reports_each_point_when_its_gradients_are_final() {
        let lomar = preset("tiny").unwrap();
        for m in [lomar.clone(), mae_recipe(lomar)] {
            let layout = ParamLayout::new(&m);
            let params = layout.init(5);
            let batch = BatchSource::open(&m, 9, 2, &DataArgs::default(), None)
                .unwrap()
                .next_batch(2)
                .unwrap();
            let before: Vec<f32> = (0..layout.total())
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-4 - 0.05)
                .collect();
            let mut grads = before.clone();
            let mut seen: Vec<(usize, Vec<f32>)> = Vec::new();
            let mut ready = |from: usize, g: &mut [f32]| seen.push((from, g.to_vec()));
            let (p, b, g) = (&params, &batch, &mut grads);
            match m.method {
                Method::Lomar => LomarWorkspace::new(&m)
                    .and_then(|mut w| w.loss_and_grad_reporting(p, b, g, 1.0, &mut ready)),
                Method::Mae => MaeWorkspace::new(&m)
                    .and_then(|mut w| w.loss_and_grad_reporting(p, b, g, 1.0, &mut ready)),
            }
            .unwrap();
            let points: Vec<usize> = seen.iter().map(|(p, _)| *p).collect();
            assert_eq!(points, ready_points(layout.ranges()), "{:?}", m.method);
            for (from, snapshot) in &seen {
                assert_eq!(
                    snapshot[*from..],
                    grads[*from..],
                    "{:?} at {from}",
                    m.method
                );
                assert_eq!(
                    snapshot[..*from],
                    before[..*from],
                    "{:?} at {from}",
                    m.method
                );
            }
        }
    }

    /// A bucket is handed out at the first point at or below its start, once, and a
    /// schedule that never reached the last point says so.
    #[test]
    fn a_schedule_hands_out_each_bucket_at_its_point() {
        let layout = ParamLayout::new(&preset("tiny").unwrap());
        let unit = layout.ranges().blocks[0].fc1_w.len();
        let plan = BucketPlan::new(&layout, unit);
        let mut s = plan.schedule();
        let mut seen = Vec::new();
        for &p in plan.points() {
            let due = s.due(p);
            for b in due {
                assert!(b.start >= p);
            }
            seen.extend_from_slice(due);
            if p > 0 {
                assert!(s.finish().is_err());
            }
        }
        s.finish().unwrap();
        assert_eq!(seen, plan.buckets());
        assert!(s.due(0).is_empty());
    }
}
