//! End-to-end tests: real registries, the real `walt-server`, the real `walt` CLI.
//!
//! Run `cargo build --workspace --bins` first (tests/run does it). The
//! `harness` module checks the harness alone (registry, skopeo, proxy).

mod bad_input;
mod bounds;
mod build;
mod build_base;
mod build_cli;
mod build_oracle;
mod build_platform;
mod client_config;
mod common;
mod cp_lazy;
mod crash;
mod deep;
mod docker;
mod formats;
mod golden_show_search;
mod harness;
mod hostile_text;
mod hub;
mod hub_meta;
mod install;
mod manage;
mod nodes_cli;
mod nodes_defaults;
mod nodes_dhcp;
mod nodes_event;
mod nodes_real_image;
mod nodes_serve;
mod publish;
mod races;
mod registries;
mod search;
mod search_latency;
mod secrets;
mod setup;
mod shared_downloads;
mod shell;
mod squash;
mod tls;
mod tokens;
mod users;
mod vnodes;
mod walt_files;
mod walt_flows;
mod workingset;
