//! MAE's token placement on the GPU (kernels/tokens.cu `place_tokens_*`, docs/DESIGN.md
//! §7.2): the slot maps a batch's masks give the encoder's and the decoder's input, and
//! the launchers. A placement writes row `r` of `x` `[R, D]` f32 as source row `slot[r]`
//! plus a bias, or a fill row where `slot[r] < 0`, then adds position row `pos_row[r]`.
//!
//! - encoder: `[B·(1+V), D]` from the embedded kept patches `[B·V, D]`, fill `cls_token`,
//!   the patch's sin-cos row (row 0, zeros, for cls);
//! - decoder: `[B·(1+N), Dd]` from `decoder_embed`'s output `[B·(1+V), Dd]` (each image's
//!   cls row and its kept patches back at their grid cells), fill `mask_token`, row `t`
//!   for token `t`.

use anyhow::Result;
use cudarc::driver::PushKernelArg;

use super::device::DevPtr;
use super::kernels::Kernels;
use super::launch::{blocks, check_scratch, chunking, config, int, ROW_THREADS, THREADS};
use super::storage::Storage;
use crate::config::ModelConfig;
use crate::data::batch::Batch;

/// Where each row of MAE's encoder and decoder inputs comes from, for one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaeSlots {
    /// `[B·(1+V)]` -1 for cls, else the embedded patch row `b·V + j` of kept patch `j`.
    pub enc_slot: Vec<i32>,
    /// `[B·(1+V)]` 0 for cls, else 1 + the kept patch's grid index.
    pub enc_pos_row: Vec<i32>,
    /// `[B·(1+N)]` the encoded row of each decoder token: `b·(1+V)` for cls,
    /// `b·(1+V) + 1 + j` for kept patch `j`, -1 for a masked patch.
    pub dec_slot: Vec<i32>,
}

impl MaeSlots {
    /// The maps of a validated MAE batch.
    pub fn new(batch: &Batch, m: &ModelConfig) -> MaeSlots {
        let (n, v) = (m.window_area(), m.visible_per_window());
        let images = batch.images_len;
        let mut slots = MaeSlots {
            enc_slot: Vec::with_capacity(images * (1 + v)),
            enc_pos_row: Vec::with_capacity(images * (1 + v)),
            dec_slot: Vec::with_capacity(images * (1 + n)),
        };
        for (b, image) in batch.visible_slots(m).chunks(n).enumerate() {
            slots.enc_slot.push(-1);
            slots.enc_pos_row.push(0);
            slots.dec_slot.push((b * (1 + v)) as i32);
            for (patch, kept) in image.iter().enumerate() {
                match kept {
                    Some(j) => {
                        let j = *j as usize;
                        slots.enc_slot.push((b * v + j) as i32);
                        slots.enc_pos_row.push((1 + patch) as i32);
                        slots.dec_slot.push((b * (1 + v) + 1 + j) as i32);
                    }
                    None => slots.dec_slot.push(-1),
                }
            }
        }
        slots
    }
}

/// `[images·(1+N)]` the decoder's position rows: token `t` of every image takes row `t`.
pub fn decoder_pos_rows(m: &ModelConfig, images: usize) -> Vec<i32> {
    let tokens = m.seq_len() as i32;
    (0..images).flat_map(|_| 0..tokens).collect()
}

/// The sizes of one placement.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// Rows `R` of the output.
    pub rows: usize,
    /// Rows of the source.
    pub src_rows: usize,
    /// Rows of the position table.
    pub pos_rows: usize,
    pub width: usize,
}

impl Placement {
    /// Checks every buffer of a placement against its sizes. The slot values themselves
    /// live on the device; [`MaeSlots`] makes them in range.
    fn check(&self, src: &DevPtr<impl Sized>, slot: &DevPtr<i32>, what: &str) -> Result<()> {
        src.check(self.src_rows * self.width, &format!("{what} src"))?;
        slot.check(self.rows, &format!("{what} slot"))
    }
}

impl<T: Storage> Kernels<T> {
    /// src [R_src, D] T, bias, fill [D] f32, pos [pos_rows, D] f32, slot, pos_row [R] i32
    ///   -> x [R, D] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn place_tokens_forward(
        &self,
        src: DevPtr<T>,
        bias: DevPtr<f32>,
        fill: DevPtr<f32>,
        pos: DevPtr<f32>,
        slot: DevPtr<i32>,
        pos_row: DevPtr<i32>,
        x: DevPtr<f32>,
        shape: Placement,
    ) -> Result<()> {
        let d = shape.width;
        shape.check(&src, &slot, "place_tokens_forward")?;
        bias.check(d, "place_tokens_forward bias")?;
        fill.check(d, "place_tokens_forward fill")?;
        pos.check(shape.pos_rows * d, "place_tokens_forward pos")?;
        pos_row.check(shape.rows, "place_tokens_forward pos_row")?;
        x.check(shape.rows * d, "place_tokens_forward x")?;
        let width = int(d, "width")?;
        let mut b = self.stream.launch_builder(&self.place_tokens_forward);
        b.arg(src.addr())
            .arg(bias.addr())
            .arg(fill.addr())
            .arg(pos.addr())
            .arg(slot.addr())
            .arg(pos_row.addr())
            .arg(x.addr())
            .arg(&width);
        let grid = int(shape.rows, "token rows")? as u32;
        self.run(b, config((grid, 1), ROW_THREADS), "place_tokens_forward")
    }

    /// dx [R, D] f32, slot [R] i32 -> dsrc [R_src, D] T (written), d_fill, d_bias [D] f32
    /// (+=); the positions are fixed and take no gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn place_tokens_backward(
        &self,
        dx: DevPtr<f32>,
        slot: DevPtr<i32>,
        dsrc: DevPtr<T>,
        scratch: DevPtr<f32>,
        d_fill: DevPtr<f32>,
        d_bias: DevPtr<f32>,
        shape: Placement,
    ) -> Result<()> {
        let d = shape.width;
        shape.check(&dsrc, &slot, "place_tokens_backward")?;
        dx.check(shape.rows * d, "place_tokens_backward dx")?;
        let (per, chunks) = chunking(shape.rows);
        check_scratch(&scratch, 2 * chunks * d, "place_tokens_backward")?;
        let rows = int(shape.rows, "rows")?;
        let width = int(d, "width")?;
        let per_i = int(per, "rows per chunk")?;
        let mut b = self.stream.launch_builder(&self.place_tokens_backward);
        b.arg(dx.addr())
            .arg(slot.addr())
            .arg(dsrc.addr())
            .arg(scratch.addr())
            .arg(&rows)
            .arg(&width)
            .arg(&per_i);
        let grid = (blocks(d, THREADS)?, chunks as u32);
        self.run(b, config(grid, THREADS), "place_tokens_backward")?;
        self.partials_finish(scratch, &[d_fill, d_bias], chunks, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{mae_recipe, preset};
    use crate::data::batch::Pixels;

    #[test]
    fn slots_of_a_hand_made_batch() {
        // A 2x2 grid, one patch kept per image: image 0 keeps patch 2, image 1 patch 0.
        let mut m = mae_recipe(preset("tiny").unwrap());
        m.image = 2 * m.patch;
        m.window = 2;
        assert_eq!((m.masked_per_window(), m.visible_per_window()), (3, 1));
        let batch = Batch {
            images_len: 2,
            images: Pixels::Bytes(vec![0; 2 * 3 * m.image * m.image]),
            window_origin: vec![0; 4],
            mask_index: vec![0, 1, 3, 1, 2, 3],
        };
        batch.validate(&m).unwrap();
        let slots = MaeSlots::new(&batch, &m);
        assert_eq!(slots.enc_slot, [-1, 0, -1, 1]);
        assert_eq!(slots.enc_pos_row, [0, 3, 0, 1]);
        // Encoded rows: image 0 cls 0, patch 1; image 1 cls 2, patch 3.
        assert_eq!(slots.dec_slot, [0, -1, -1, 1, -1, 2, 3, -1, -1, -1]);
        assert_eq!(decoder_pos_rows(&m, 2), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    }
}
