//! The benchmark scenarios of issue 6, one module each.

pub mod policy_cost;
