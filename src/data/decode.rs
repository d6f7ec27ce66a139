//! Reading one image file into 8-bit RGB: JPEG or PNG, recognised by content, of any
//! size; grayscale, grayscale-alpha, RGBA and palette inputs become RGB as PIL's
//! `convert("RGB")` makes them (alpha is dropped), and 16-bit inputs are scaled to 8 bits
//! (the reference pipeline is 8-bit from the decoder to `ToTensor`). Anything else is an
//! error that names why.

use std::fs::File;
use std::io::{Cursor, Read};
use std::path::Path;

use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::resize::RgbView;

/// The largest decoded image accepted (the decoder's own default limit): a file that
/// claims more is refused before any allocation.
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Buffers for decoding one image after another: a loader thread keeps one, so file
/// bytes and pixels reuse memory instead of taking fresh pages from the kernel per image.
#[derive(Default)]
pub struct Decoder {
    bytes: Vec<u8>,
    pixels: Vec<u8>,
}

impl Decoder {
    /// Reads and decodes the image file at `path`; the view lives until the next call.
    pub fn read(&mut self, path: &Path) -> Result<RgbView<'_>, String> {
        self.decode_from(|bytes| {
            File::open(path)
                .and_then(|mut f| f.read_to_end(bytes))
                .map(drop)
                .map_err(|e| format!("cannot read: {e}"))
        })
    }

    /// Decodes the encoded image that `fill` appends to the (emptied) byte buffer.
    pub fn decode_from(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
    ) -> Result<RgbView<'_>, String> {
        self.bytes.clear();
        fill(&mut self.bytes)?;
        let (width, height) = decode_into(&self.bytes, &mut self.pixels)?;
        Ok(RgbView::new(&self.pixels, width, height))
    }

    /// A `width × height` RGB image whose pixels `fill` writes, nothing to decode (raw
    /// shards).
    pub fn raw(
        &mut self,
        width: usize,
        height: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<RgbView<'_>, String> {
        let len = width * height * 3;
        if len as u64 > MAX_DECODED_BYTES {
            return Err(format!("image too large ({width}x{height})"));
        }
        self.pixels.resize(len, 0);
        fill(&mut self.pixels[..len])?;
        Ok(RgbView::new(&self.pixels[..len], width, height))
    }
}

/// Decodes an image held in memory into `pixels`, as 8-bit RGB (`[height, width, 3]`);
/// returns (width, height).
pub fn decode_into(bytes: &[u8], pixels: &mut Vec<u8>) -> Result<(usize, usize), String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".to_string());
    }
    let message = |e: image::ImageError| e.to_string().trim_end().to_string();
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    match reader.format() {
        Some(ImageFormat::Jpeg) => check_jpeg_complete(bytes)?,
        Some(ImageFormat::Png) => {}
        _ => return Err("not a JPEG or PNG image".to_string()),
    }
    let decoder = reader.into_decoder().map_err(message)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(format!("image has no pixels ({width}x{height})"));
    }
    if decoder.total_bytes() > MAX_DECODED_BYTES {
        return Err(format!(
            "image too large to decode ({width}x{height}, {} MiB)",
            decoder.total_bytes() >> 20
        ));
    }
    if decoder.color_type() == ColorType::Rgb8 {
        // The common case (colour JPEGs): straight into the reused buffer.
        pixels.resize(decoder.total_bytes() as usize, 0);
        decoder.read_image(pixels).map_err(message)?;
    } else {
        let rgb = DynamicImage::from_decoder(decoder)
            .map_err(message)?
            .into_rgb8();
        pixels.clear();
        pixels.extend_from_slice(rgb.as_raw());
    }
    Ok((width as usize, height as usize))
}

/// Walks a JPEG's segments to its end-of-image marker. The decoder fills a scan that the
/// file cuts short with grey and reports nothing, so a truncated download would otherwise
/// train as a half-grey image. (PNG needs no such check: its compressed stream carries a
/// checksum the decoder verifies.)
fn check_jpeg_complete(b: &[u8]) -> Result<(), String> {
    // Almost every file ends with the marker, and a scan cut short cannot: inside
    // entropy-coded data 0xFF is always followed by 0x00 or a restart number.
    if b.ends_with(&[0xFF, 0xD9]) {
        return Ok(());
    }
    let truncated =
        || Err("truncated JPEG (the file ends before its end-of-image marker)".to_string());
    // Past the start-of-image marker, which recognising the format checked.
    let mut i = 2;
    loop {
        let (Some(&lead), Some(&marker)) = (b.get(i), b.get(i + 1)) else {
            return truncated();
        };
        if lead != 0xFF {
            return Err(format!("corrupt JPEG: no marker at byte {i}"));
        }
        match marker {
            // A fill byte before the marker.
            0xFF => {
                i += 1;
                continue;
            }
            0xD9 => return Ok(()),
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            _ => {}
        }
        let Some(len) = b.get(i + 2..i + 4) else {
            return truncated();
        };
        i += 2 + u16::from_be_bytes([len[0], len[1]]) as usize;
        if marker == 0xDA {
            // Entropy-coded data runs to the first marker that is not a stuffed 0xFF or
            // a restart.
            loop {
                match b
                    .get(i..)
                    .and_then(|rest| rest.iter().position(|&v| v == 0xFF))
                {
                    Some(offset) => i += offset,
                    None => return truncated(),
                }
                match b.get(i + 1) {
                    None => return truncated(),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{
        GrayAlphaImage, GrayImage, ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba, RgbaImage,
    };

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    }

    fn decode_bytes(bytes: &[u8]) -> Result<RgbImage, String> {
        let mut pixels = Vec::new();
        let (w, h) = decode_into(bytes, &mut pixels)?;
        Ok(RgbImage::from_raw(w as u32, h as u32, pixels).unwrap())
    }

    fn rgb_at(d: &RgbImage, x: u32, y: u32) -> [u8; 3] {
        d.get_pixel(x, y).0
    }

    #[test]
    fn every_png_mode_becomes_rgb() {
        let gray = GrayImage::from_fn(5, 3, |x, y| Luma([(x * 40 + y) as u8]));
        let d = decode_bytes(&encode(gray.into(), ImageFormat::Png)).unwrap();
        assert_eq!((d.width(), d.height()), (5, 3));
        assert_eq!(rgb_at(&d, 4, 2), [162; 3]);

        let la = GrayAlphaImage::from_fn(2, 2, |_, _| LumaA([200, 7]));
        let d = decode_bytes(&encode(la.into(), ImageFormat::Png)).unwrap();
        assert_eq!(rgb_at(&d, 1, 1), [200; 3]);

        let rgba = RgbaImage::from_fn(3, 2, |x, _| Rgba([10 * x as u8, 20, 30, 0]));
        let d = decode_bytes(&encode(rgba.into(), ImageFormat::Png)).unwrap();
        assert_eq!(rgb_at(&d, 2, 1), [20, 20, 30]);

        let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
            ImageBuffer::from_fn(2, 2, |x, y| Rgb([65535, 1000 * x as u16, 7 * y as u16]));
        let d = decode_bytes(&encode(deep.into(), ImageFormat::Png)).unwrap();
        // 16 bits to 8: v / 257, rounded.
        assert_eq!(rgb_at(&d, 1, 1), [255, 4, 0]);

        let deep_gray: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(2, 1, |x, _| Luma([30000 + x as u16]));
        let d = decode_bytes(&encode(deep_gray.into(), ImageFormat::Png)).unwrap();
        assert_eq!(rgb_at(&d, 1, 0), [117; 3]);
    }

    #[test]
    fn a_palette_png_becomes_its_colours() {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 4, 1);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(vec![255, 0, 0, 0, 255, 0, 0, 0, 255]);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0, 1, 2, 1]).unwrap();
        }
        let d = decode_bytes(&bytes).unwrap();
        assert_eq!(rgb_at(&d, 0, 0), [255, 0, 0]);
        assert_eq!(rgb_at(&d, 2, 0), [0, 0, 255]);
        assert_eq!(rgb_at(&d, 3, 0), [0, 255, 0]);
    }

    #[test]
    fn jpegs_decode_in_colour_and_grayscale() {
        let colour = RgbImage::from_fn(40, 30, |_, _| Rgb([200, 100, 50]));
        let d = decode_bytes(&encode(colour.into(), ImageFormat::Jpeg)).unwrap();
        assert_eq!((d.width(), d.height()), (40, 30));
        let [r, g, b] = rgb_at(&d, 20, 15);
        // JPEG is lossy: a flat colour comes back within a few levels.
        assert!(r.abs_diff(200) <= 3 && g.abs_diff(100) <= 3 && b.abs_diff(50) <= 3);
        let gray = GrayImage::from_fn(17, 9, |_, _| Luma([90]));
        let d = decode_bytes(&encode(gray.into(), ImageFormat::Jpeg)).unwrap();
        let [r, g, b] = rgb_at(&d, 3, 3);
        assert!(r == g && g == b && r.abs_diff(90) <= 3);
    }

    #[test]
    fn broken_inputs_are_errors_that_say_why() {
        let jpeg = encode(
            RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 9])).into(),
            ImageFormat::Jpeg,
        );
        let png = encode(
            RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 9])).into(),
            ImageFormat::Png,
        );
        assert_eq!(decode_bytes(&[]).err().unwrap(), "empty file (0 bytes)");
        assert_eq!(
            decode_bytes(b"just some text").err().unwrap(),
            "not a JPEG or PNG image"
        );
        for cut in [
            jpeg.len() - 2,
            jpeg.len() - 10,
            jpeg.len() - 100,
            jpeg.len() / 2,
            20,
            3,
        ] {
            let err = decode_bytes(&jpeg[..cut]).err();
            assert!(err.is_some(), "JPEG cut at {cut} of {} bytes", jpeg.len());
        }
        for cut in [png.len() - 20, png.len() / 2, 40, 10] {
            assert!(decode_bytes(&png[..cut]).is_err(), "PNG cut at {cut} bytes");
        }
        let err = decode_bytes(&jpeg[..jpeg.len() - 100]).err().unwrap();
        assert!(err.starts_with("truncated JPEG"), "{err}");
        // Bytes after the end-of-image marker (some cameras append data) are fine.
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"appended \xff\xd8 data");
        assert!(decode_bytes(&trailing).is_ok());
        // An APP1 segment (where EXIF keeps a thumbnail) holding an end-of-image marker
        // of its own does not hide a truncated main image.
        let app1 = [0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD8, 0xFF, 0xD9];
        let with_thumbnail = |end: usize| [&jpeg[..2], &app1, &jpeg[2..end]].concat();
        assert!(decode_bytes(&with_thumbnail(jpeg.len())).is_ok());
        let err = decode_bytes(&with_thumbnail(jpeg.len() - 100))
            .err()
            .unwrap();
        assert!(err.starts_with("truncated JPEG"), "{err}");
        let missing = Decoder::default()
            .read(Path::new("/nonexistent/lomar/x.jpg"))
            .err()
            .unwrap();
        assert!(missing.starts_with("cannot read:"), "{missing}");
    }
}
