//! The file formats: safetensors tensors, batch files, checkpoints, and the pretrained
//! weights the evaluation commands read (docs/DESIGN.md §2).

pub mod batch_file;
pub mod checkpoint;
pub mod finite;
pub mod pretrained;
pub mod tensor_file;
