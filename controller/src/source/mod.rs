//! Where desired state comes from. `dir`: a watched directory of YAML/JSON files.

pub mod dir;
