//! The benchmark scenarios of issue 6, one module each.

pub mod auth_load;
pub mod policy_cost;
