//! A small RGB rasteriser for the figures lomar writes (reconstructions, loss curves):
//! filled and outlined rectangles, anti-aliased polylines, scaled images and bitmap text,
//! saved as PNG.

pub mod font;

use std::path::Path;

use anyhow::{Context, Result};

/// An 8-bit RGB colour.
pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];

/// An RGB picture, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A `width × height` canvas filled with `background`.
    pub fn new(width: usize, height: usize, background: Rgb) -> Canvas {
        Canvas {
            width,
            height,
            pixels: background.repeat(width * height),
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// The colour at `(x, y)`.
    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Sets `(x, y)`; points outside the canvas are ignored.
    pub fn set(&mut self, x: i64, y: i64, colour: Rgb) {
        self.blend(x, y, colour, 1.0);
    }

    /// Mixes `colour` into `(x, y)` with opacity `alpha` in [0, 1].
    pub fn blend(&mut self, x: i64, y: i64, colour: Rgb, alpha: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || alpha <= 0.0 {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        let a = alpha.min(1.0);
        for (p, c) in self.pixels[i..i + 3].iter_mut().zip(colour) {
            *p = (*p as f32 * (1.0 - a) + c as f32 * a).round() as u8;
        }
    }

    pub fn fill_rect(&mut self, x: i64, y: i64, w: usize, h: usize, colour: Rgb) {
        for yy in y..y + h as i64 {
            for xx in x..x + w as i64 {
                self.set(xx, yy, colour);
            }
        }
    }

    /// The border of the `w × h` rectangle at `(x, y)`, `thickness` pixels inwards.
    pub fn outline_rect(
        &mut self,
        x: i64,
        y: i64,
        w: usize,
        h: usize,
        thickness: usize,
        colour: Rgb,
    ) {
        let t = thickness.min(w).min(h);
        self.fill_rect(x, y, w, t, colour);
        self.fill_rect(x, y + (h - t) as i64, w, t, colour);
        self.fill_rect(x, y, t, h, colour);
        self.fill_rect(x + (w - t) as i64, y, t, h, colour);
    }

    /// Draws `rgb` (`w × h`, interleaved) at `(x, y)`, each pixel as a `scale × scale`
    /// block.
    pub fn blit(&mut self, x: i64, y: i64, rgb: &[u8], w: usize, h: usize, scale: usize) {
        for sy in 0..h {
            for sx in 0..w {
                let i = (sy * w + sx) * 3;
                let colour = [rgb[i], rgb[i + 1], rgb[i + 2]];
                self.fill_rect(
                    x + (sx * scale) as i64,
                    y + (sy * scale) as i64,
                    scale,
                    scale,
                    colour,
                );
            }
        }
    }

    /// A polyline through `points` (pixel coordinates, pixel centres at `+0.5`),
    /// `width` pixels wide, anti-aliased. Where segments meet, each pixel takes the
    /// coverage of the nearest segment, so joints are not drawn twice.
    pub fn polyline(&mut self, points: &[(f64, f64)], width: f64, colour: Rgb) {
        if points.is_empty() {
            return;
        }
        let reach = width / 2.0 + 1.0;
        let mut coverage = vec![0.0f32; self.width * self.height];
        let single = [points[0], points[0]];
        let segments: Vec<&[(f64, f64)]> = if points.len() == 1 {
            vec![&single]
        } else {
            points.windows(2).collect()
        };
        for seg in segments {
            let ((x0, y0), (x1, y1)) = (seg[0], seg[1]);
            let (lo_x, hi_x) = (x0.min(x1) - reach, x0.max(x1) + reach);
            let (lo_y, hi_y) = (y0.min(y1) - reach, y0.max(y1) + reach);
            let clip = |v: f64, n: usize| v.clamp(0.0, n as f64) as usize;
            for py in clip(lo_y.floor(), self.height)..clip(hi_y.ceil(), self.height) {
                for px in clip(lo_x.floor(), self.width)..clip(hi_x.ceil(), self.width) {
                    let d = distance_to_segment((px as f64 + 0.5, py as f64 + 0.5), seg[0], seg[1]);
                    let c = (width / 2.0 + 0.5 - d).clamp(0.0, 1.0) as f32;
                    let cell = &mut coverage[py * self.width + px];
                    *cell = cell.max(c);
                }
            }
        }
        for (i, &c) in coverage.iter().enumerate() {
            if c > 0.0 {
                self.blend((i % self.width) as i64, (i / self.width) as i64, colour, c);
            }
        }
    }

    /// `text` with its top-left corner at `(x, y)`, each font pixel a `scale × scale`
    /// block.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, colour: Rgb) {
        for (n, c) in text.chars().enumerate() {
            let left = x + (n * font::ADVANCE * scale) as i64;
            for (row, bits) in font::glyph(c).iter().enumerate() {
                for col in 0..font::GLYPH_WIDTH {
                    if bits >> (font::GLYPH_WIDTH - 1 - col) & 1 == 1 {
                        self.fill_rect(
                            left + (col * scale) as i64,
                            y + (row * scale) as i64,
                            scale,
                            scale,
                            colour,
                        );
                    }
                }
            }
        }
    }

    /// Writes the canvas as an 8-bit RGB PNG.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        image::save_buffer_with_format(
            path,
            &self.pixels,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Euclidean distance from `p` to the segment `a`–`b`.
fn distance_to_segment(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 == 0.0 {
        0.0
    } else {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - cx).powi(2) + (p.1 - cy).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangles_and_outlines_cover_exactly_their_pixels() {
        let mut c = Canvas::new(10, 8, WHITE);
        c.fill_rect(-2, 1, 4, 2, BLACK);
        assert_eq!(c.get(1, 1), BLACK);
        assert_eq!(c.get(2, 1), WHITE);
        assert_eq!(c.get(0, 3), WHITE);
        c.outline_rect(4, 2, 5, 4, 1, [255, 0, 0]);
        assert_eq!(c.get(4, 2), [255, 0, 0]);
        assert_eq!(c.get(8, 5), [255, 0, 0]);
        assert_eq!(c.get(6, 3), WHITE);
        assert_eq!(c.get(9, 5), WHITE);
    }

    #[test]
    fn a_horizontal_line_is_solid_on_its_row_and_faint_beside_it() {
        let mut c = Canvas::new(20, 9, WHITE);
        c.polyline(&[(2.0, 4.5), (10.0, 4.5), (18.0, 4.5)], 1.0, BLACK);
        for x in 3..17 {
            assert_eq!(c.get(x, 4), BLACK, "x {x}");
            assert_eq!(c.get(x, 3), WHITE, "x {x}");
            assert_eq!(c.get(x, 5), WHITE, "x {x}");
        }
        // A diagonal touches the pixels along it partly.
        let mut c = Canvas::new(10, 10, WHITE);
        c.polyline(&[(0.0, 0.0), (10.0, 10.0)], 1.0, BLACK);
        for i in 0..10 {
            assert_eq!(c.get(i, i), BLACK);
        }
        let beside = c.get(1, 0)[0];
        assert!(beside > 0 && beside < 255, "{beside}");
        assert_eq!(c.get(9, 0), WHITE);
    }

    #[test]
    fn blits_scale_and_text_draws_its_glyphs() {
        let mut c = Canvas::new(8, 8, WHITE);
        c.blit(2, 2, &[10, 20, 30, 40, 50, 60], 2, 1, 3);
        assert_eq!(c.get(2, 2), [10, 20, 30]);
        assert_eq!(c.get(4, 4), [10, 20, 30]);
        assert_eq!(c.get(5, 2), [40, 50, 60]);
        assert_eq!(c.get(2, 5), WHITE);
        let mut t = Canvas::new(12, 8, WHITE);
        t.text(0, 0, "1-", 1, BLACK);
        for (row, bits) in font::glyph('1').iter().enumerate() {
            for col in 0..5 {
                let on = bits >> (4 - col) & 1 == 1;
                assert_eq!(t.get(col, row) == BLACK, on, "row {row} col {col}");
            }
        }
        assert_eq!(t.get(6, 3), BLACK);
        assert_eq!(t.get(5, 3), WHITE);
    }
}
