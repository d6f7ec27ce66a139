//! Bicubic resampling of a crop, the way PIL's `Image.resize(size, BICUBIC)` computes it
//! (the reference pipeline crops and resizes PIL images): a separable convolution, first
//! along rows then along columns, with the bicubic kernel (a = -0.5) widened by the
//! downscale factor so a shrink averages instead of aliasing, taps cut at the crop's edge
//! and each output's weights renormalised to sum to one, and every pass clipped to the
//! valid range. Arithmetic is f32 throughout (PIL rounds to 8 bits between the passes),
//! so results agree with PIL up to that quantisation.

use super::augment::CropBox;

/// One channel of a decoded pixel; `MAX` is full intensity.
pub trait Channel: Copy + Send + Sync + 'static {
    const MAX: f32;
    fn value(self) -> f32;
}

impl Channel for u8 {
    const MAX: f32 = 255.0;
    fn value(self) -> f32 {
        self as f32
    }
}

impl Channel for u16 {
    const MAX: f32 = 65535.0;
    fn value(self) -> f32 {
        self as f32
    }
}

impl Channel for f32 {
    const MAX: f32 = 1.0;
    fn value(self) -> f32 {
        self
    }
}

/// An RGB image, row-major, channels interleaved.
#[derive(Clone, Copy, Debug)]
pub struct RgbView<'a, C> {
    pub pixels: &'a [C],
    pub width: usize,
    pub height: usize,
}

impl<'a, C: Channel> RgbView<'a, C> {
    pub fn new(pixels: &'a [C], width: usize, height: usize) -> Self {
        assert_eq!(pixels.len(), width * height * 3, "RgbView: buffer size");
        RgbView {
            pixels,
            width,
            height,
        }
    }
}

/// PIL's bicubic kernel, a = -0.5, support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: the first input it reads and its weights (at most `stride`).
struct Taps {
    first: Vec<usize>,
    count: Vec<usize>,
    /// `[out, stride]`, zero past `count`.
    weights: Vec<f32>,
    stride: usize,
}

impl Taps {
    /// Resampling `in_size` inputs to `out_size` outputs; every weight is multiplied by
    /// `gain` (folds the channel's `1 / MAX` into the first pass).
    fn new(in_size: usize, out_size: usize, gain: f32) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        let stride = 2 * support.ceil() as usize + 1;
        let mut taps = Taps {
            first: Vec::with_capacity(out_size),
            count: Vec::with_capacity(out_size),
            weights: vec![0.0; out_size * stride],
            stride,
        };
        let mut w = vec![0.0f64; stride];
        for o in 0..out_size {
            let centre = (o as f64 + 0.5) * scale;
            let first = (centre - support + 0.5).max(0.0) as usize;
            let end = ((centre + support + 0.5) as usize).min(in_size);
            let count = end - first;
            let mut total = 0.0;
            for (i, wi) in w[..count].iter_mut().enumerate() {
                *wi = bicubic(((first + i) as f64 - centre + 0.5) / filter_scale);
                total += *wi;
            }
            let row = &mut taps.weights[o * stride..][..count];
            for (r, wi) in row.iter_mut().zip(&w[..count]) {
                let normalised = if total != 0.0 { wi / total } else { *wi };
                *r = normalised as f32 * gain;
            }
            taps.first.push(first);
            taps.count.push(count);
        }
        taps
    }

    fn of(&self, o: usize) -> (usize, &[f32]) {
        (
            self.first[o],
            &self.weights[o * self.stride..][..self.count[o]],
        )
    }
}

/// `crop` of `image` resampled to `out_w × out_h`: RGB in [0, 1], row-major, channels
/// interleaved.
pub fn resize_crop<C: Channel>(
    image: &RgbView<C>,
    crop: CropBox,
    out_w: usize,
    out_h: usize,
) -> Vec<f32> {
    assert!(
        crop.width > 0
            && crop.height > 0
            && crop.left + crop.width <= image.width
            && crop.top + crop.height <= image.height,
        "resize_crop: {crop:?} outside a {}x{} image",
        image.width,
        image.height
    );
    // Rows: [crop.height, out_w, 3].
    let across = Taps::new(crop.width, out_w, 1.0 / C::MAX);
    let mut rows = vec![0.0f32; crop.height * out_w * 3];
    for (out_row, y) in rows.chunks_exact_mut(out_w * 3).zip(crop.top..) {
        let start = (y * image.width + crop.left) * 3;
        let src = &image.pixels[start..start + crop.width * 3];
        for (x, out) in out_row.chunks_exact_mut(3).enumerate() {
            let (first, weights) = across.of(x);
            let mut acc = [0.0f32; 3];
            for (&w, p) in weights.iter().zip(src[first * 3..].chunks_exact(3)) {
                acc[0] += w * p[0].value();
                acc[1] += w * p[1].value();
                acc[2] += w * p[2].value();
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a.clamp(0.0, 1.0);
            }
        }
    }
    // Columns: [out_h, out_w, 3].
    let down = Taps::new(crop.height, out_h, 1.0);
    let line = out_w * 3;
    let mut out = vec![0.0f32; out_h * line];
    for (y, out_row) in out.chunks_exact_mut(line).enumerate() {
        let (first, weights) = down.of(y);
        for (k, &w) in weights.iter().enumerate() {
            let src = &rows[(first + k) * line..][..line];
            for (o, &s) in out_row.iter_mut().zip(src) {
                *o += w * s;
            }
        }
        for o in out_row.iter_mut() {
            *o = o.clamp(0.0, 1.0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(w: usize, h: usize) -> CropBox {
        CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        }
    }

    /// A `len × 1` grey image from values in [0, 1].
    fn grey_row(values: &[f32]) -> Vec<f32> {
        values.iter().flat_map(|&v| [v, v, v]).collect()
    }

    fn red(rgb: &[f32]) -> Vec<f32> {
        rgb.chunks(3).map(|p| p[0]).collect()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn bicubic_kernel_values() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(0.25), 0.8671875);
        assert_eq!(bicubic(-0.75), 0.2265625);
        assert_eq!(bicubic(1.25), -0.0703125);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
    }

    #[test]
    fn halving_widens_the_kernel_and_renormalises_at_the_edges() {
        // 4 → 2: scale 2, support 4, kernel argument (x - centre + 0.5) / 2.
        // Output 0 (centre 1): inputs 0..4 at -0.25, 0.25, 0.75, 1.25 → weights
        // 0.8671875, 0.8671875, 0.2265625, -0.0703125 (sum 1.890625).
        // Output 1 (centre 3): the same weights mirrored.
        let src = grey_row(&[0.0, 0.2, 0.4, 1.0]);
        let out = resize_crop(&RgbView::new(&src, 4, 1), whole(4, 1), 2, 1);
        let (a, b, c, d) = (0.8671875, 0.2265625, -0.0703125, 1.890625);
        assert_close(
            &red(&out),
            &[
                (a * 0.2 + b * 0.4 + c * 1.0) / d,
                (c * 0.0 + b * 0.2 + a * 0.4 + a * 1.0) / d,
            ],
        );
    }

    #[test]
    fn doubling_cuts_taps_at_the_crop_edge() {
        // 2 → 4: scale 1/2, support 2. Output 0 (centre 0.25) reads inputs 0 and 1 at
        // 0.25 and 1.25: weights 0.8671875 and -0.0703125, renormalised by their sum.
        // Output 1 (centre 0.75) reads them at -0.25 and 0.75.
        let src = grey_row(&[0.2, 0.6]);
        let out = resize_crop(&RgbView::new(&src, 2, 1), whole(2, 1), 4, 1);
        let (a, b, c) = (0.8671875, 0.2265625, -0.0703125);
        assert_close(
            &red(&out),
            &[
                (a * 0.2 + c * 0.6) / (a + c),
                (a * 0.2 + b * 0.6) / (a + b),
                (b * 0.2 + a * 0.6) / (a + b),
                (c * 0.2 + a * 0.6) / (a + c),
            ],
        );
    }

    #[test]
    fn a_crop_reads_only_its_own_pixels_in_both_directions() {
        // 3 × 3 crop at (1, 2) of a 6 × 5 image, kept at its size, with 8-bit pixels coding
        // their position: the output is the crop divided by 255.
        let (w, h) = (6, 5);
        let src: Vec<u8> = (0..w * h * 3).map(|i| i as u8).collect();
        let crop = CropBox {
            top: 1,
            left: 2,
            height: 3,
            width: 3,
        };
        let out = resize_crop(&RgbView::new(&src, w, h), crop, 3, 3);
        for y in 0..3 {
            for x in 0..3 {
                for c in 0..3 {
                    let byte = ((1 + y) * w + 2 + x) * 3 + c;
                    let got = out[(y * 3 + x) * 3 + c];
                    assert!((got - byte as f32 / 255.0).abs() < 1e-6, "y{y} x{x} c{c}");
                }
            }
        }
        // Shrinking the crop to one pixel weighs its 3 × 3 pixels only, by (7/9, 1, 7/9)
        // per axis (the kernel at -1/3, 0, 1/3 of the widened support): symmetric weights
        // over a linear ramp give the centre pixel, (2, 3).
        let out = resize_crop(&RgbView::new(&src, w, h), crop, 1, 1);
        let centre = |c: usize| ((2 * w + 3) * 3 + c) as f64 / 255.0;
        assert_close(&out, &[centre(0), centre(1), centre(2)]);
    }

    #[test]
    fn overshoot_is_clipped_to_the_valid_range() {
        // Bicubic rings at a step; PIL clips, so must we.
        let src = grey_row(&[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let out = resize_crop(&RgbView::new(&src, 6, 1), whole(6, 1), 17, 1);
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)), "{out:?}");
        assert!(out.contains(&0.0) && out.contains(&1.0));
        // 16-bit channels scale by 65535.
        let wide = [65535u16, 0, 32768];
        let out = resize_crop(&RgbView::new(&wide, 1, 1), whole(1, 1), 1, 1);
        assert_close(&out, &[1.0, 0.0, 32768.0 / 65535.0]);
    }
}
