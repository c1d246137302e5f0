//! Brokkr's hub: the database entities and store, the controllers that mirror custom
//! resources into it, the agent API, and the status mirror.

pub mod entity;
pub mod store;
