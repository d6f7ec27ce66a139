//! Bicubic resampling of a crop, computed as Pillow's `Image.resize(size, BICUBIC)` on an
//! 8-bit RGB image computes it (the reference pipeline crops and resizes PIL images), to
//! the same bytes: a separable convolution, first along rows then along columns, with the
//! bicubic kernel (a = -0.5) widened by the downscale factor so a shrink averages instead
//! of aliasing, taps cut at the crop's edge, each output's weights renormalised to sum to
//! one and rounded to 22-bit fixed point, and each pass rounded and clipped to 8 bits.

use std::cell::RefCell;

use super::augment::CropBox;

/// An 8-bit RGB image, row-major, channels interleaved.
#[derive(Clone, Copy, Debug)]
pub struct RgbView<'a> {
    pub pixels: &'a [u8],
    pub width: usize,
    pub height: usize,
}

impl<'a> RgbView<'a> {
    pub fn new(pixels: &'a [u8], width: usize, height: usize) -> Self {
        assert_eq!(pixels.len(), width * height * 3, "RgbView: buffer size");
        RgbView {
            pixels,
            width,
            height,
        }
    }
}

/// Fraction bits of the fixed-point weights (Pillow's `PRECISION_BITS`): a sum of 8-bit
/// values times weights whose magnitudes add up to little more than one stays in i32.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel, a = -0.5, support 2.
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

/// Per output position, the `width` inputs it reads from `first` on and their fixed-point
/// weights. Every position reads the same number of inputs (zero weights pad the shorter
/// ones, shifted left at the far edge to stay inside), so the inner loops have a fixed
/// length.
struct Taps {
    first: Vec<usize>,
    /// `[out, width]`.
    weights: Vec<i32>,
    width: usize,
}

impl Taps {
    /// Resampling `in_size` inputs to `out_size` outputs.
    fn new(in_size: usize, out_size: usize) -> Taps {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = 2.0 * filter_scale;
        // No output reads more than 2·ceil(support) + 1 inputs.
        let width = (2 * support.ceil() as usize + 1).min(in_size);
        let inverse = 1.0 / filter_scale;
        let one = (1u32 << PRECISION_BITS) as f64;
        let mut taps = Taps {
            first: Vec::with_capacity(out_size),
            weights: vec![0; out_size * width],
            width,
        };
        let mut w = vec![0.0f64; width];
        for o in 0..out_size {
            let centre = (o as f64 + 0.5) * scale;
            // Truncation as in C; a negative start clamps to 0 either way.
            let first = (centre - support + 0.5).max(0.0) as usize;
            let end = ((centre + support + 0.5) as usize).min(in_size);
            let count = end - first;
            let mut total = 0.0;
            for (i, wi) in w[..count].iter_mut().enumerate() {
                *wi = bicubic(((first + i) as f64 - centre + 0.5) * inverse);
                total += *wi;
            }
            let start = first.min(in_size - width);
            let row = &mut taps.weights[o * width..][..width];
            for (fixed, &wi) in row[first - start..][..count].iter_mut().zip(&w) {
                let normalised = if total != 0.0 { wi / total } else { wi };
                // Round half away from zero, then truncate, as Pillow does.
                *fixed = if normalised < 0.0 {
                    (-0.5 + normalised * one) as i32
                } else {
                    (0.5 + normalised * one) as i32
                };
            }
            taps.first.push(start);
        }
        taps
    }

    fn of(&self, o: usize) -> (usize, &[i32]) {
        (self.first[o], &self.weights[o * self.width..][..self.width])
    }
}

/// A fixed-point sum back to a byte: Pillow's `clip8` (the initial half is the rounding).
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Working buffers of one thread's resizes, kept between images: fresh buffers this
/// large come from the kernel zeroed page by page, which costs more than the arithmetic.
#[derive(Default)]
struct Scratch {
    columns: Vec<u8>,
    across: Vec<u8>,
    rows: Vec<u8>,
    acc: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Resamples the lines of `src` (`[in, line]`) into `out` (`[out, line]`): output line
/// `o` is the weighted sum of input lines `first..first + width`, every position of the
/// line alike, so the inner loop runs over contiguous bytes and vectorises.
#[inline(always)]
fn resample_lines(taps: &Taps, src: &[u8], line: usize, out: &mut [u8], acc: &mut Vec<i32>) {
    acc.resize(line, 0);
    for (o, out_line) in out.chunks_exact_mut(line).enumerate() {
        let (first, weights) = taps.of(o);
        acc.fill(HALF);
        for (k, &w) in weights.iter().enumerate() {
            let input = &src[(first + k) * line..][..line];
            for (a, &v) in acc.iter_mut().zip(input) {
                *a += w * v as i32;
            }
        }
        for (o, &a) in out_line.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// Rows `top..top + height`, columns `left..left + width` of the RGB image `src`
/// (`src_width` pixels wide), transposed into `out`: `[width, height, 3]`.
#[inline(always)]
fn transpose(src: &[u8], src_width: usize, crop: CropBox, out: &mut [u8]) {
    let (w, h) = (crop.width, crop.height);
    for y in 0..h {
        let row = &src[((crop.top + y) * src_width + crop.left) * 3..][..w * 3];
        for (x, pixel) in row.chunks_exact(3).enumerate() {
            out[(x * h + y) * 3..][..3].copy_from_slice(pixel);
        }
    }
}

/// `buf` holding exactly `len` bytes, reusing its allocation.
fn sized(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    buf.resize(len, 0);
    &mut buf[..len]
}

/// `crop` of `image` resampled into `out`, `out_w` pixels wide: 8-bit RGB, row-major,
/// interleaved (`[out_h, out_w, 3]`).
pub fn resize_crop(image: &RgbView, crop: CropBox, out_w: usize, out: &mut [u8]) {
    assert!(
        crop.width > 0
            && crop.height > 0
            && crop.left + crop.width <= image.width
            && crop.top + crop.height <= image.height,
        "resize_crop: {crop:?} outside a {}x{} image",
        image.width,
        image.height
    );
    assert!(
        out_w > 0 && !out.is_empty() && out.len().is_multiple_of(out_w * 3),
        "resize_crop: output size"
    );
    SCRATCH.with_borrow_mut(|scratch| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, as just checked.
            unsafe { resize_avx2(image, crop, out, out_w, scratch) };
            return;
        }
        resize(image, crop, out, out_w, scratch);
    });
}

/// The same code compiled for AVX2, whose 32-bit multiplies the line passes need to
/// vectorise well; integer arithmetic gives the same bytes either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resize_avx2(
    image: &RgbView,
    crop: CropBox,
    out: &mut [u8],
    out_w: usize,
    scratch: &mut Scratch,
) {
    resize(image, crop, out, out_w, scratch);
}

/// `crop` of `image` into `out` (`[out_h, out_w, 3]`).
#[inline(always)]
fn resize(image: &RgbView, crop: CropBox, out: &mut [u8], out_w: usize, scratch: &mut Scratch) {
    let Scratch {
        columns,
        across,
        rows,
        acc,
    } = scratch;
    let (w, h) = (crop.width, crop.height);
    let out_h = out.len() / (out_w * 3);
    // Along rows first, as Pillow, but on the transposed crop so that both passes run
    // over whole lines: [w, h, 3] → [out_w, h, 3].
    let columns = sized(columns, w * h * 3);
    transpose(image.pixels, image.width, crop, columns);
    let across = sized(across, out_w * h * 3);
    resample_lines(&Taps::new(w, out_w), columns, h * 3, across, acc);
    // Back to rows, [h, out_w, 3], then along columns: [out_h, out_w, 3].
    let rows = sized(rows, h * out_w * 3);
    let whole = CropBox {
        top: 0,
        left: 0,
        height: out_w,
        width: h,
    };
    transpose(across, h, whole, rows);
    resample_lines(&Taps::new(h, out_h), rows, out_w * 3, out, acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resized(image: &RgbView, crop: CropBox, w: usize, h: usize) -> Vec<u8> {
        let mut out = vec![0; w * h * 3];
        resize_crop(image, crop, w, &mut out);
        out
    }

    fn whole(w: usize, h: usize) -> CropBox {
        CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        }
    }

    /// A `len × 1` grey image.
    fn grey_row(values: &[u8]) -> Vec<u8> {
        values.iter().flat_map(|&v| [v, v, v]).collect()
    }

    fn red(rgb: &[u8]) -> Vec<u8> {
        rgb.chunks(3).map(|p| p[0]).collect()
    }

    fn rounded(values: &[f64]) -> Vec<u8> {
        values.iter().map(|v| v.round() as u8).collect()
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
        let src = grey_row(&[0, 51, 102, 255]);
        let out = resized(&RgbView::new(&src, 4, 1), whole(4, 1), 2, 1);
        let (a, b, c, d) = (0.8671875, 0.2265625, -0.0703125, 1.890625);
        let want = [
            (a * 51.0 + b * 102.0 + c * 255.0) / d,
            (b * 51.0 + a * 102.0 + a * 255.0) / d,
        ];
        assert_eq!(red(&out), rounded(&want));
    }

    #[test]
    fn doubling_cuts_taps_at_the_crop_edge() {
        // 2 → 4: scale 1/2, support 2. Output 0 (centre 0.25) reads inputs 0 and 1 at
        // 0.25 and 1.25: weights 0.8671875 and -0.0703125, renormalised by their sum.
        // Output 1 (centre 0.75) reads them at -0.25 and 0.75.
        let src = grey_row(&[40, 200]);
        let out = resized(&RgbView::new(&src, 2, 1), whole(2, 1), 4, 1);
        let (a, b, c) = (0.8671875, 0.2265625, -0.0703125);
        let want = [
            (a * 40.0 + c * 200.0) / (a + c),
            (a * 40.0 + b * 200.0) / (a + b),
            (b * 40.0 + a * 200.0) / (a + b),
            (c * 40.0 + a * 200.0) / (a + c),
        ];
        assert_eq!(red(&out), rounded(&want));
    }

    #[test]
    fn a_crop_reads_only_its_own_pixels_in_both_directions() {
        // A 3 × 3 crop at (1, 2) of a 6 × 5 image whose bytes code their position.
        let (w, h) = (6, 5);
        let src: Vec<u8> = (0..w * h * 3).map(|i| i as u8).collect();
        let crop = CropBox {
            top: 1,
            left: 2,
            height: 3,
            width: 3,
        };
        // Kept at its size, the crop is copied.
        let out = resized(&RgbView::new(&src, w, h), crop, 3, 3);
        for y in 0..3 {
            for x in 0..3 {
                for c in 0..3 {
                    let byte = ((1 + y) * w + 2 + x) * 3 + c;
                    assert_eq!(out[(y * 3 + x) * 3 + c] as usize, byte, "y{y} x{x} c{c}");
                }
            }
        }
        // Shrunk to one pixel, it weighs its 3 × 3 pixels only, by (7/9, 1, 7/9) per
        // axis (the kernel at -1/3, 0, 1/3 of the widened support): symmetric weights
        // over a linear ramp give the centre pixel, (2, 3).
        let out = resized(&RgbView::new(&src, w, h), crop, 1, 1);
        let centre = (2 * w + 3) * 3;
        assert_eq!(out, [centre as u8, centre as u8 + 1, centre as u8 + 2]);
    }

    #[test]
    fn overshoot_is_clipped_to_the_valid_range() {
        // Bicubic rings at a step: without the clip, values left of the step would wrap
        // below 0 and values right of it above 255.
        let src = grey_row(&[0, 0, 0, 255, 255, 255]);
        let out = red(&resized(&RgbView::new(&src, 6, 1), whole(6, 1), 17, 1));
        let step = out.iter().position(|&v| v > 0).unwrap();
        assert!(out[..step].iter().all(|&v| v == 0), "{out:?}");
        assert!(out[step..].windows(2).all(|p| p[0] <= p[1]), "{out:?}");
        assert_eq!(*out.last().unwrap(), 255);
    }

    /// Pillow 13.0's bytes for crops of a 7 × 5 image shrunk, enlarged and both:
    /// `Image.frombytes("RGB", (7, 5), bytes((37 * i + 11) % 256 for i in range(105)))
    /// .crop((left, top, left + width, top + height)).resize(size, Image.BICUBIC)`.
    #[test]
    fn output_bytes_match_pillow() {
        let src: Vec<u8> = (0..105u32).map(|i| ((37 * i + 11) % 256) as u8).collect();
        let view = RgbView::new(&src, 7, 5);
        let cases: [(CropBox, usize, usize, &[u8]); 5] = [
            (
                CropBox {
                    top: 1,
                    left: 2,
                    height: 4,
                    width: 5,
                },
                3,
                2,
                &[
                    176, 75, 112, 151, 184, 90, 132, 169, 125, 67, 92, 129, 175, 77, 111, 149, 186,
                    67,
                ],
            ),
            (
                CropBox {
                    top: 0,
                    left: 0,
                    height: 5,
                    width: 7,
                },
                11,
                9,
                &[
                    2, 39, 76, 50, 101, 138, 132, 153, 190, 220, 41, 78, 187, 35, 82, 87, 124, 161,
                    166, 213, 61, 170, 207, 28, 58, 95, 116, 110, 147, 198, 172, 209, 246, 5, 42,
                    79, 53, 104, 141, 135, 156, 193, 223, 44, 81, 190, 38, 85, 90, 127, 164, 169,
                    216, 64, 173, 210, 31, 61, 98, 119, 113, 150, 206, 175, 212, 255, 11, 48, 85,
                    59, 110, 147, 141, 162, 199, 229, 50, 87, 196, 44, 91, 96, 133, 170, 175, 222,
                    70, 179, 216, 37, 67, 104, 124, 119, 156, 213, 181, 218, 255, 16, 53, 90, 63,
                    115, 152, 147, 167, 204, 246, 55, 92, 211, 48, 96, 101, 138, 175, 179, 237, 75,
                    184, 233, 45, 72, 110, 134, 124, 160, 147, 186, 223, 146, 21, 58, 95, 69, 120,
                    157, 151, 172, 209, 239, 60, 97, 206, 54, 101, 106, 143, 180, 185, 232, 80,
                    189, 226, 54, 77, 114, 145, 129, 166, 67, 191, 228, 0, 26, 63, 100, 82, 125,
                    162, 147, 177, 214, 121, 65, 102, 103, 65, 106, 111, 148, 185, 196, 129, 85,
                    194, 108, 59, 82, 110, 151, 134, 179, 64, 196, 233, 0, 31, 68, 105, 94, 130,
                    167, 144, 182, 219, 24, 70, 107, 19, 75, 111, 116, 153, 190, 206, 45, 90, 199,
                    11, 64, 87, 107, 155, 139, 191, 77, 201, 238, 1, 37, 74, 111, 99, 136, 173,
                    150, 188, 225, 31, 76, 113, 26, 80, 117, 122, 159, 196, 211, 52, 96, 205, 18,
                    70, 93, 113, 161, 145, 196, 83, 207, 244, 7, 40, 77, 114, 102, 139, 176, 154,
                    191, 228, 42, 79, 116, 36, 83, 120, 125, 162, 199, 214, 62, 99, 208, 29, 73,
                    96, 117, 164, 148, 199, 86, 210, 247, 10,
                ],
            ),
            (
                CropBox {
                    top: 0,
                    left: 0,
                    height: 3,
                    width: 5,
                },
                2,
                4,
                &[
                    107, 82, 127, 165, 140, 88, 112, 87, 132, 170, 145, 93, 120, 95, 140, 178, 153,
                    101, 125, 100, 145, 183, 158, 106,
                ],
            ),
            (
                CropBox {
                    top: 0,
                    left: 0,
                    height: 5,
                    width: 7,
                },
                4,
                3,
                &[
                    68, 98, 135, 185, 75, 116, 140, 186, 76, 121, 158, 193, 82, 113, 150, 165, 91,
                    131, 156, 166, 98, 136, 172, 92, 91, 128, 165, 63, 109, 146, 174, 64, 115, 151,
                    181, 72,
                ],
            ),
            (
                CropBox {
                    top: 2,
                    left: 1,
                    height: 3,
                    width: 4,
                },
                5,
                5,
                &[
                    133, 182, 219, 245, 64, 101, 189, 70, 124, 125, 187, 146, 221, 255, 28, 142,
                    186, 223, 162, 68, 105, 131, 80, 128, 136, 160, 150, 225, 166, 32, 155, 192,
                    229, 37, 74, 111, 44, 97, 134, 154, 119, 156, 231, 1, 38, 162, 198, 235, 34,
                    80, 117, 44, 104, 140, 161, 122, 162, 237, 0, 44, 165, 202, 239, 47, 84, 121,
                    54, 107, 144, 164, 129, 166, 241, 11, 48,
                ],
            ),
        ];
        for (crop, w, h, want) in cases {
            assert_eq!(resized(&view, crop, w, h), want, "{crop:?} to {w}x{h}");
        }
    }
}
