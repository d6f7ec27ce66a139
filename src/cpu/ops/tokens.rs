//! Moving tokens between the window sequences and the rows that are actually computed:
//! assembly of each sequence from cls, embedded visible patches and the mask token, and
//! selection of the masked positions for the head.

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
            for (row, slot) in patches.chunks_exact_mut(d).zip(slots) {
                match slot {
                    Some(v) => row.copy_from_slice(&emb[*v as usize * d..][..d]),
                    None => row.copy_from_slice(mask_token),
                }
            }
        });
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
            for (row, slot) in patches.chunks_exact(d).zip(slots) {
                match slot {
                    Some(v) => demb[*v as usize * d..][..d].copy_from_slice(row),
                    None => dmask.iter_mut().zip(row).for_each(|(a, &g)| *a += g),
                }
            }
            (cls_row.to_vec(), dmask)
        })
        .collect();
    for (dc, dm) in partials {
        dcls.iter_mut().zip(dc).for_each(|(a, g)| *a += g);
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
