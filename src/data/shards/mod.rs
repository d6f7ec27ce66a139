//! Sharded data sets (docs/DESIGN.md §2.9, §4.5): an image folder converted once by
//! `lomar shards` into webdataset-style tar files of pre-shrunk images, JPEG or raw RGB,
//! plus an index; read back as a seeded stream of samples whose images cost a fraction of
//! a full-size decode.

pub mod index;
pub mod read;
pub mod write;

pub use index::{ImageFormat, ShardIndex, INDEX_FILE};
pub use read::{Part, ShardSet, ShardStream};
pub use write::{convert, ConvertOptions, Progress};

/// The largest image a shard may hold, in bytes of RGB (the decoder's own limit).
pub const MAX_IMAGE_BYTES: u64 = super::decode::MAX_DECODED_BYTES;
