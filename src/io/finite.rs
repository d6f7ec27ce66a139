//! Finding the first NaN or infinity in a large buffer: every f32 tensor read from a file,
//! the parameters before a checkpoint is written, and the features an encoder produces.
//! Batches are checked when read from a file, not on every training step (the sources
//! cannot produce a non-finite pixel, and a non-finite loss stops the run). The buffers
//! are large (a checkpoint of vit_base holds 260M values), so the scan runs over the cores.

use rayon::prelude::*;

/// Values per block: large enough that rayon's per-block cost vanishes, small enough that
/// the blocks spread over every core.
const BLOCK: usize = 1 << 16;

/// The index of the first value that is NaN or infinite, if any.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    let block = values
        .par_chunks(BLOCK)
        .position_first(|block| block.iter().any(|v| !v.is_finite()))?;
    let start = block * BLOCK;
    let offset = values[start..].iter().position(|v| !v.is_finite())?;
    Some(start + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bad_value_is_found_across_blocks() {
        let mut values = vec![0.5f32; 5 * BLOCK + 17];
        assert_eq!(first_non_finite(&values), None);
        values[4 * BLOCK + 3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&values), Some(4 * BLOCK + 3));
        values[BLOCK + 9] = f32::NAN;
        values[BLOCK + 11] = f32::INFINITY;
        assert_eq!(first_non_finite(&values), Some(BLOCK + 9));
        values[0] = f32::NAN;
        assert_eq!(first_non_finite(&values), Some(0));
        assert_eq!(first_non_finite(&[]), None);
    }
}
