//! The benchmark scenarios of issue 6 (and `etcd_api`, issue 11's, `policy_safety`, issue 12's,
//! `policy_languages`, issue 13's), one module each.

pub mod auth_load;
pub mod etcd_api;
pub mod hot_path;
pub mod hot_swap;
pub mod http_vs_etcd;
pub mod outage;
pub mod penetration;
pub mod policy_cost;
pub mod policy_languages;
pub mod policy_safety;
pub mod scale;
