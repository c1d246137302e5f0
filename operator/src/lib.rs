//! Brokkr's hub: the database entities and store, the controllers that mirror custom
//! resources into it, the agent API, and the status mirror.

pub mod alerts;
pub mod api;
pub mod audit;
pub mod config;
pub mod controllers;
pub mod entity;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod render;
pub mod rollout;
pub mod run;
pub mod status;
pub mod store;
