//! Moving tokens between the window sequences and the rows that are actually computed:
//! assembly of each sequence from cls, embedded visible patches and the mask token, and
//! selection of the masked positions for the head. MAE uses the same moves: cls before
//! its visible rows (the encoder's input), and its encoded rows back at their positions
//! among mask tokens (the decoder's input).

use rayon::prelude::*;

use super::super::real::Real;

/// Sequence `[S, 1+K², D]` from cls `[D]`, the embedded visible rows `[S*V, D]` at their
/// positions and the mask token `[D]` at every masked one. `slots` `[S, K²]` comes from
/// `Batch::visible_slots`. Overwrites x.
pub fn assemble_tokens_forward<T: Real>(
    x: &mut [T],
    cls: &[T],
    mask_token: &[T],
    embedded: &[T],
    slots: &[Option<u32>],
    area: usize,
) {
    let d = cls.len();
    let seqs = slots.len() / area;
    assert!(
        mask_token.len() == d
            && x.len() == seqs * (1 + area) * d
            && embedded.len().is_multiple_of(seqs * d)
    );
    let visible = embedded.len() / (seqs * d);
    x.par_chunks_mut((1 + area) * d)
        .zip(embedded.par_chunks(visible * d))
        .zip(slots.par_chunks(area))
        .for_each(|((seq, emb), slots)| {
            let (cls_row, patches) = seq.split_at_mut(d);
            cls_row.copy_from_slice(cls);
            place_positions(patches, emb, mask_token, slots);
        });
}

/// Each position's row `[K², D]`: its embedded row from `emb` `[V, D]` where visible, the
/// mask token where masked.
fn place_positions<T: Real>(patches: &mut [T], emb: &[T], mask_token: &[T], slots: &[Option<u32>]) {
    let d = mask_token.len();
    for (row, slot) in patches.chunks_exact_mut(d).zip(slots) {
        match slot {
            Some(v) => row.copy_from_slice(&emb[*v as usize * d..][..d]),
            None => row.copy_from_slice(mask_token),
        }
    }
}

/// [`place_positions`] in reverse: from the positions' gradients `[K², D]`, demb `[V, D]`
/// overwritten where visible and dmask `[D]` += the masked ones.
fn split_positions<T: Real>(demb: &mut [T], dmask: &mut [T], patches: &[T], slots: &[Option<u32>]) {
    let d = dmask.len();
    for (row, slot) in patches.chunks_exact(d).zip(slots) {
        match slot {
            Some(v) => demb[*v as usize * d..][..d].copy_from_slice(row),
            None => dmask.iter_mut().zip(row).for_each(|(a, &g)| *a += g),
        }
    }
}

/// From dx `[S, 1+K², D]`: dcls `[D]` += Σ over sequences, dmask_token `[D]` += Σ over
/// masked positions, dembedded `[S*V, D]` overwritten with the visible positions' rows.
pub fn assemble_tokens_backward<T: Real>(
    dcls: &mut [T],
    dmask_token: &mut [T],
    dembedded: &mut [T],
    dx: &[T],
    slots: &[Option<u32>],
    area: usize,
) {
    let d = dcls.len();
    let seqs = slots.len() / area;
    assert!(
        dmask_token.len() == d
            && dx.len() == seqs * (1 + area) * d
            && dembedded.len().is_multiple_of(seqs * d)
    );
    let visible = dembedded.len() / (seqs * d);
    let partials: Vec<(Vec<T>, Vec<T>)> = dembedded
        .par_chunks_mut(visible * d)
        .zip(dx.par_chunks((1 + area) * d))
        .zip(slots.par_chunks(area))
        .map(|((demb, seq), slots)| {
            let (cls_row, patches) = seq.split_at(d);
            let mut dmask = vec![T::zero(); d];
            split_positions(demb, &mut dmask, patches, slots);
            (cls_row.to_vec(), dmask)
        })
        .collect();
    for (dc, dm) in partials {
        dcls.iter_mut().zip(dc).for_each(|(a, g)| *a += g);
        dmask_token.iter_mut().zip(dm).for_each(|(a, g)| *a += g);
    }
}

/// Sequence `[S, 1+V, D]`: cls `[D]`, then the rows `[S*V, D]` (MAE's encoder input).
/// Overwrites x.
pub fn prepend_cls_forward<T: Real>(x: &mut [T], cls: &[T], rows: &[T]) {
    let d = cls.len();
    assert!(d > 0 && x.len() > rows.len() && (x.len() - rows.len()).is_multiple_of(d));
    let seqs = (x.len() - rows.len()) / d;
    assert!(rows.len().is_multiple_of(seqs));
    let per_seq = rows.len() / seqs;
    x.par_chunks_mut(d + per_seq)
        .zip(rows.par_chunks(per_seq))
        .for_each(|(seq, rows)| {
            let (cls_row, rest) = seq.split_at_mut(d);
            cls_row.copy_from_slice(cls);
            rest.copy_from_slice(rows);
        });
}

/// From dx `[S, 1+V, D]`: dcls `[D]` += Σ over sequences of the first row, drows
/// `[S*V, D]` overwritten with the rest.
pub fn prepend_cls_backward<T: Real>(dcls: &mut [T], drows: &mut [T], dx: &[T]) {
    let d = dcls.len();
    assert!(d > 0 && dx.len() > drows.len() && (dx.len() - drows.len()).is_multiple_of(d));
    let seqs = (dx.len() - drows.len()) / d;
    assert!(drows.len().is_multiple_of(seqs));
    let per_seq = drows.len() / seqs;
    drows
        .par_chunks_mut(per_seq)
        .zip(dx.par_chunks(d + per_seq))
        .for_each(|(drows, seq)| drows.copy_from_slice(&seq[d..]));
    for seq in dx.chunks_exact(d + per_seq) {
        dcls.iter_mut().zip(&seq[..d]).for_each(|(a, &g)| *a += g);
    }
}

/// Sequence `[S, 1+N, D]` from encoded sequences `[S, 1+V, D]`: each one's cls row
/// first, its `V` rows at their visible positions, `mask_token` `[D]` at every masked one
/// (MAE's decoder input). `slots` `[S, N]` as for [`assemble_tokens_forward`].
/// Overwrites x.
pub fn unshuffle_tokens_forward<T: Real>(
    x: &mut [T],
    mask_token: &[T],
    encoded: &[T],
    slots: &[Option<u32>],
    area: usize,
) {
    let d = mask_token.len();
    let seqs = slots.len() / area;
    assert!(x.len() == seqs * (1 + area) * d && encoded.len().is_multiple_of(seqs * d));
    let per_seq = encoded.len() / seqs;
    x.par_chunks_mut((1 + area) * d)
        .zip(encoded.par_chunks(per_seq))
        .zip(slots.par_chunks(area))
        .for_each(|((seq, enc), slots)| {
            let (cls_row, patches) = seq.split_at_mut(d);
            cls_row.copy_from_slice(&enc[..d]);
            place_positions(patches, &enc[d..], mask_token, slots);
        });
}

/// From dx `[S, 1+N, D]`: dencoded `[S, 1+V, D]` overwritten, dmask_token `[D]` += Σ
/// over masked positions.
pub fn unshuffle_tokens_backward<T: Real>(
    dmask_token: &mut [T],
    dencoded: &mut [T],
    dx: &[T],
    slots: &[Option<u32>],
    area: usize,
) {
    let d = dmask_token.len();
    let seqs = slots.len() / area;
    assert!(dx.len() == seqs * (1 + area) * d && dencoded.len().is_multiple_of(seqs * d));
    let per_seq = dencoded.len() / seqs;
    let partials: Vec<Vec<T>> = dencoded
        .par_chunks_mut(per_seq)
        .zip(dx.par_chunks((1 + area) * d))
        .zip(slots.par_chunks(area))
        .map(|((denc, seq), slots)| {
            let (cls_row, patches) = seq.split_at(d);
            let (dcls, drows) = denc.split_at_mut(d);
            dcls.copy_from_slice(cls_row);
            let mut dmask = vec![T::zero(); d];
            split_positions(drows, &mut dmask, patches, slots);
            dmask
        })
        .collect();
    for dm in partials {
        dmask_token.iter_mut().zip(dm).for_each(|(a, g)| *a += g);
    }
}

/// The masked tokens of x `[S, T, D]` in `mask_index` `[S, M]` order → picked `[S*M, D]`.
/// Overwrites picked.
pub fn gather_masked_tokens<T: Real>(picked: &mut [T], x: &[T], mask_index: &[u32], tokens: usize) {
    let rows = mask_index.len();
    assert!(rows > 0 && picked.len().is_multiple_of(rows));
    let d = picked.len() / rows;
    assert!(x.len().is_multiple_of(tokens * d));
    let seqs = x.len() / (tokens * d);
    let per_seq = rows / seqs;
    assert_eq!(per_seq * seqs, rows);
    picked
        .par_chunks_mut(per_seq * d)
        .zip(x.par_chunks(tokens * d))
        .zip(mask_index.par_chunks(per_seq))
        .for_each(|((out, seq), idx)| {
            for (row, &i) in out.chunks_exact_mut(d).zip(idx) {
                row.copy_from_slice(&seq[(1 + i as usize) * d..][..d]);
            }
        });
}

/// From dpicked `[S*M, D]`: dx `[S, T, D]` += each row at its masked token.
pub fn scatter_masked_tokens<T: Real>(
    dx: &mut [T],
    dpicked: &[T],
    mask_index: &[u32],
    tokens: usize,
) {
    let rows = mask_index.len();
    assert!(rows > 0 && dpicked.len().is_multiple_of(rows));
    let d = dpicked.len() / rows;
    assert!(dx.len().is_multiple_of(tokens * d));
    let seqs = dx.len() / (tokens * d);
    let per_seq = rows / seqs;
    assert_eq!(per_seq * seqs, rows);
    dx.par_chunks_mut(tokens * d)
        .zip(dpicked.par_chunks(per_seq * d))
        .zip(mask_index.par_chunks(per_seq))
        .for_each(|((seq, grads), idx)| {
            for (g, &i) in grads.chunks_exact(d).zip(idx) {
                let row = &mut seq[(1 + i as usize) * d..][..d];
                row.iter_mut().zip(g).for_each(|(a, &b)| *a += b);
            }
        });
}
