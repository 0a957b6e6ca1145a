//! cacher: an S3-backed cache for CI jobs.
//!
//! Layers, from the bottom: [`store`] moves bytes under full keys (S3 or a local
//! directory), [`transfer`] moves whole files with retries and integrity checks,
//! [`key`] and [`config`] turn what the user typed into full keys and settings, and
//! [`commands`] glue them together, one module per subcommand.

pub mod archive;
pub mod chunk;
pub mod cli;
pub mod commands;
pub mod config;
pub mod docker;
pub mod exclude;
pub mod http;
pub mod image_archive;
pub mod key;
pub mod memory;
pub mod restore;
pub mod sign;
pub mod state;
pub mod store;
pub mod task;
pub mod temp;
pub mod transfer;
pub mod tree_stream;
pub mod ui;
pub mod update;
pub mod version;
