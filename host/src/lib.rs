//! regcache: a service-registry cache in front of etcd, steered by a sandboxed WebAssembly policy.
//!
//! The library is the product; the `regcache` binary is logging, a runtime and signals around
//! it. A [`Host`] is a whole host: [`Host::build`] does every piece of I/O from a validated
//! configuration, [`Host::serve`] serves until a future completes, then drains and stops.
//!
//! ```
//! use regcache::Host;
//! use regcache::config::ConfigLayer;
//! use regcache::model::{Node, Service};
//!
//! # fn main() -> anyhow::Result<()> {
//! let runtime = tokio::runtime::Runtime::new()?;
//! runtime.block_on(async {
//!     // No etcd endpoint: an embedded in-memory registry. Port 0: a free port.
//!     let config = ConfigLayer::parse_toml(r#"listen = "127.0.0.1:0""#, "example")?.validate()?;
//!     let host = Host::build(config).await?;
//!
//!     let greeter = Service {
//!         name: "greeter".into(),
//!         version: "1.0".into(),
//!         nodes: vec![Node {
//!             id: "greeter-1".into(),
//!             address: "127.0.0.1:8080".into(),
//!             ..Node::default()
//!         }],
//!         ..Service::default()
//!     };
//!     host.registry().register(&greeter).await?;
//!     // A lookup in-process, decided by the embedded default policy as over HTTP.
//!     let answer = host.cache().lookup("greeter").await?;
//!     assert_eq!(answer.node_ids().collect::<Vec<_>>(), ["greeter-1"]);
//!
//!     let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//!     let serving = tokio::spawn(host.serve(async {
//!         let _ = stopped.await;
//!     }));
//!     let _ = stop.send(());
//!     serving.await??;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! `ARCHITECTURE.md` at the repository root is the map. The modules an embedder uses:
//!
//! - [`config`]: the host's settings (TOML, flags, environment), validated without I/O.
//! - [`model`]: go-micro's service model and its JSON codec.
//! - [`registry`]: the registry interface, etcd's implementation (the only code that speaks
//!   etcd) and the in-memory one.
//! - [`cache`]: the registry cache, decided by the policy on every lookup.
//! - [`decision`]: what a policy is asked and answers, free of wasm detail.
//! - [`policy`]: the only code that speaks wasmtime: loading, validating, hot-swapping policies.
//!
//! The fronts (the HTTP API), metrics, the snapshot file, the state dir and file handling are
//! the host's own, reached through [`Host`].
#![deny(missing_docs)]

pub mod cache;
pub mod config;
pub mod decision;
mod etcd_api;
mod fsutil;
mod host;
mod http;
mod metrics;
pub mod model;
pub mod policy;
pub mod recording;
pub mod registry;
mod snapshot;
mod state_dir;

pub use host::Host;
