//! Integration tests: the built `cacher` binary against a real Garage node, a real HTTP
//! server and coreutils. One binary, one module per topic (ripgrep's layout).

mod util;

mod actions;

mod bad_input;
mod concurrency;
mod config;
mod crash;
mod dir;
mod docker;
mod faults;
mod file_store;
mod gc;
mod keys;
mod plain;
mod recipes;
mod release;
mod restore;
mod shipping;
mod signed;
mod soak;
mod soft;
mod tls;
mod warm;
