//! End-to-end test harness for walt: real distribution registries (plain,
//! TLS + basic auth, TLS unverified), a fault-injecting proxy, an image
//! builder/pusher, and runners for the real `walt-server` and `walt` CLI.

pub mod certs;
pub mod default_images;
pub mod dhcp;
pub mod docker;
pub mod fixture;
pub mod http;
pub mod hub_fixture;
pub mod image;
pub mod netserve;
pub mod proxy;
pub mod registry;
pub mod store;
pub mod tmux;
pub mod token_issuer;
pub mod tree;
pub mod util;
pub mod vnet;
pub mod walt;

pub use fixture::{Env, EnvOpts, SECURE_PASS, SECURE_USER};
pub use http::RegistryClient;
pub use hub_fixture::HubFixture;
pub use image::{
    BuiltImage, BuiltIndex, Compression, Format, ImageBuilder, ImageConfig, Layer, RawEntry,
};
pub use proxy::{LatencyProxy, LatencyStats, Proxy};
pub use registry::{Registry, RegistryOpts};
pub use store::{
    StoreSnapshot, assert_store_unchanged, assert_tmp_empty, store_mentions, store_snapshot,
};
pub use token_issuer::{TokenAuth, TokenIssuer};
pub use walt::{CmdOutput, Walt, WaltServer};
