//! The CUDA backend's pieces, driven through cudarc with dynamic loading.

pub mod attention;
