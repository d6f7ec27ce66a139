//! The embedded default data set: structured images drawn from a seed, so pretraining
//! runs anywhere with nothing to download.
//!
//! Each image is a smooth two-colour gradient with one foreground element on it (a disc, a
//! rectangle, a triangle, a straight edge, stripes or a checkerboard) in random colours,
//! positions and sizes. Shapes give sharp edges, gradients smooth regions and textures
//! periodic ones, so a masked patch is predictable from its neighbours: reconstruction is
//! learnable, unlike white noise. Image `i` depends on `(seed, i)` alone (ChaCha stream
//! `i` of the seed), so the data state is a counter. Transcendentals come from `libm` so
//! the pixels are the same on every machine.

use std::f64::consts::{PI, TAU};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::normalise_pixel;

/// Keeps the image stream apart from the parameter and sampler streams of the same seed.
const DATA_SALT: u64 = 0xd47a_5e7c_21b9_0f63;

/// The foreground element of an image, kept as a class label for later use (linear
/// probes); pretraining ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Disc,
    Rectangle,
    Triangle,
    Edge,
    Stripes,
    Checker,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::Disc,
        Family::Rectangle,
        Family::Triangle,
        Family::Edge,
        Family::Stripes,
        Family::Checker,
    ];
}

type Rgb = [f64; 3];

/// Where the foreground colour covers the image, in unit coordinates `(u, v)` in [0, 1]².
enum Foreground {
    Disc {
        centre: (f64, f64),
        radius: f64,
    },
    Rectangle {
        centre: (f64, f64),
        half: (f64, f64),
        /// (cos, sin) of the rotation.
        rot: (f64, f64),
    },
    Triangle([(f64, f64); 3]),
    /// Half-plane `n · (p - point) > 0`.
    Edge {
        point: (f64, f64),
        normal: (f64, f64),
    },
    Stripes {
        dir: (f64, f64),
        period: f64,
        phase: f64,
    },
    Checker {
        cell: f64,
        offset: (f64, f64),
    },
}

impl Foreground {
    fn covers(&self, u: f64, v: f64) -> bool {
        match *self {
            Foreground::Disc { centre, radius } => {
                let (du, dv) = (u - centre.0, v - centre.1);
                du * du + dv * dv < radius * radius
            }
            Foreground::Rectangle { centre, half, rot } => {
                let (du, dv) = (u - centre.0, v - centre.1);
                let (x, y) = (rot.0 * du + rot.1 * dv, -rot.1 * du + rot.0 * dv);
                x.abs() < half.0 && y.abs() < half.1
            }
            Foreground::Triangle([a, b, c]) => {
                let side = |p: (f64, f64), q: (f64, f64)| {
                    (q.0 - p.0) * (v - p.1) - (q.1 - p.1) * (u - p.0)
                };
                let (s0, s1, s2) = (side(a, b), side(b, c), side(c, a));
                (s0 > 0.0 && s1 > 0.0 && s2 > 0.0) || (s0 < 0.0 && s1 < 0.0 && s2 < 0.0)
            }
            Foreground::Edge { point, normal } => {
                normal.0 * (u - point.0) + normal.1 * (v - point.1) > 0.0
            }
            Foreground::Stripes { dir, period, phase } => {
                let s = (dir.0 * u + dir.1 * v) / period + phase;
                s - libm::floor(s) < 0.5
            }
            Foreground::Checker { cell, offset } => {
                let cx = libm::floor((u + offset.0) / cell) as i64;
                let cy = libm::floor((v + offset.1) / cell) as i64;
                (cx + cy).rem_euclid(2) == 0
            }
        }
    }
}

/// One image's recipe, drawn from its own ChaCha stream.
struct Recipe {
    family: Family,
    background: (Rgb, Rgb),
    /// Unit direction of the background gradient.
    gradient_dir: (f64, f64),
    foreground_colour: Rgb,
    foreground: Foreground,
}

fn unit(angle: f64) -> (f64, f64) {
    (libm::cos(angle), libm::sin(angle))
}

impl Recipe {
    fn draw(rng: &mut ChaCha8Rng, side: usize) -> Recipe {
        // The family is the first draw, so the label needs nothing else.
        let family = Family::ALL[rng.gen_range(0..Family::ALL.len() as u32) as usize];
        let colour = |rng: &mut ChaCha8Rng| -> Rgb { [rng.gen(), rng.gen(), rng.gen()] };
        let background = (colour(rng), colour(rng));
        let gradient_dir = unit(rng.gen_range(0.0..TAU));
        let foreground_colour = colour(rng);
        // Texture scales in pixels, so they stay visible inside a patch at any resolution.
        let pixel = 1.0 / side as f64;
        let foreground = match family {
            Family::Disc => Foreground::Disc {
                centre: (rng.gen_range(0.2..0.8), rng.gen_range(0.2..0.8)),
                radius: rng.gen_range(0.1..0.35),
            },
            Family::Rectangle => Foreground::Rectangle {
                centre: (rng.gen_range(0.25..0.75), rng.gen_range(0.25..0.75)),
                half: (rng.gen_range(0.08..0.3), rng.gen_range(0.08..0.3)),
                rot: unit(rng.gen_range(0.0..PI)),
            },
            Family::Triangle => {
                let centre = (rng.gen_range(0.3..0.7), rng.gen_range(0.3..0.7));
                let radius = rng.gen_range(0.15..0.4);
                let start = rng.gen_range(0.0..TAU);
                let mut vertex = |k: f64| {
                    let (c, s) = unit(start + k * TAU / 3.0 + rng.gen_range(-0.4..0.4));
                    (centre.0 + radius * c, centre.1 + radius * s)
                };
                Foreground::Triangle([vertex(0.0), vertex(1.0), vertex(2.0)])
            }
            Family::Edge => Foreground::Edge {
                point: (rng.gen_range(0.3..0.7), rng.gen_range(0.3..0.7)),
                normal: unit(rng.gen_range(0.0..TAU)),
            },
            Family::Stripes => Foreground::Stripes {
                dir: unit(rng.gen_range(0.0..PI)),
                period: rng.gen_range(3.0..12.0) * pixel,
                phase: rng.gen(),
            },
            Family::Checker => Foreground::Checker {
                cell: rng.gen_range(3.0..10.0) * pixel,
                offset: (rng.gen(), rng.gen()),
            },
        };
        Recipe {
            family,
            background,
            gradient_dir,
            foreground_colour,
            foreground,
        }
    }

    fn colour_at(&self, u: f64, v: f64) -> Rgb {
        if self.foreground.covers(u, v) {
            return self.foreground_colour;
        }
        // Gradient position in [0, 1] along the direction, through the image centre.
        let along = (u - 0.5) * self.gradient_dir.0 + (v - 0.5) * self.gradient_dir.1;
        let t = (along / std::f64::consts::SQRT_2 + 0.5).clamp(0.0, 1.0);
        let (a, b) = self.background;
        [0, 1, 2].map(|c| a[c] + (b[c] - a[c]) * t)
    }
}

/// Square synthetic images of side `side`, addressed by index.
#[derive(Clone, Debug)]
pub struct SyntheticImages {
    seed: u64,
    side: usize,
}

impl SyntheticImages {
    pub fn new(seed: u64, side: usize) -> Self {
        SyntheticImages { seed, side }
    }

    fn rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ DATA_SALT);
        rng.set_stream(index);
        rng
    }

    /// The family of image `index`.
    pub fn label(&self, index: u64) -> Family {
        Recipe::draw(&mut self.rng(index), self.side).family
    }

    /// Writes image `index` into `out` (`[3, side, side]`) as the model sees it: the
    /// bytes of [`Self::render_bytes`], normalised.
    pub fn render(&self, index: u64, out: &mut [f32]) {
        let mut bytes = vec![0u8; out.len()];
        self.render_bytes(index, &mut bytes);
        let plane = self.side * self.side;
        for (i, (o, &b)) in out.iter_mut().zip(&bytes).enumerate() {
            *o = normalise_pixel(i / plane, b);
        }
    }

    /// Writes image `index` into `out` (`[3, side, side]`) as 8-bit colours, like a
    /// decoded photo.
    pub fn render_bytes(&self, index: u64, out: &mut [u8]) {
        let n = self.side;
        assert_eq!(out.len(), 3 * n * n, "render: output buffer size");
        let recipe = Recipe::draw(&mut self.rng(index), n);
        for y in 0..n {
            for x in 0..n {
                // Pixel centres, so the picture does not shift with resolution.
                let u = (x as f64 + 0.5) / n as f64;
                let v = (y as f64 + 0.5) / n as f64;
                let rgb = recipe.colour_at(u, v);
                for (c, value) in rgb.iter().enumerate() {
                    out[c * n * n + y * n + x] = (value.clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{IMAGENET_MEAN, IMAGENET_STD};

    fn image(images: &SyntheticImages, i: u64) -> Vec<f32> {
        let mut out = vec![0.0; 3 * 32 * 32];
        images.render(i, &mut out);
        out
    }

    #[test]
    fn an_image_depends_on_seed_and_index_alone() {
        let a = SyntheticImages::new(3, 32);
        assert_eq!(image(&a, 17), image(&SyntheticImages::new(3, 32), 17));
        assert_ne!(image(&a, 17), image(&a, 18));
        assert_ne!(image(&a, 17), image(&SyntheticImages::new(4, 32), 17));
    }

    #[test]
    fn pixels_are_normalised_colours_in_range() {
        let a = SyntheticImages::new(0, 32);
        for i in 0..50 {
            for (k, v) in image(&a, i).iter().enumerate() {
                let c = k / (32 * 32);
                let raw = v * IMAGENET_STD[c] + IMAGENET_MEAN[c];
                assert!((-1e-5..=1.0 + 1e-5).contains(&raw), "image {i}: {raw}");
            }
        }
    }

    #[test]
    fn every_family_occurs_about_equally_often() {
        let a = SyntheticImages::new(9, 32);
        let mut counts = std::collections::HashMap::new();
        for i in 0..600 {
            *counts.entry(a.label(i)).or_insert(0usize) += 1;
        }
        for f in Family::ALL {
            let c = counts.get(&f).copied().unwrap_or(0);
            assert!((60..140).contains(&c), "{f:?}: {c} of 600");
        }
    }

    /// Neighbouring pixels agree far more often than not: the images have structure.
    #[test]
    fn images_are_mostly_smooth_with_some_edges() {
        let a = SyntheticImages::new(1, 32);
        let (mut close, mut far) = (0usize, 0usize);
        for i in 0..40 {
            let img = image(&a, i);
            for y in 0..32 {
                for x in 0..31 {
                    let d = (img[y * 32 + x] - img[y * 32 + x + 1]).abs();
                    if d < 0.1 {
                        close += 1;
                    } else {
                        far += 1;
                    }
                }
            }
        }
        assert!(far > 0, "no edges at all");
        assert!(close > 4 * far, "{close} smooth vs {far} sharp neighbours");
    }
}
