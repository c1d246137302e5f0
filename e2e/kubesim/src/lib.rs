//! kubesim: an in-process Kubernetes API server for tests (being built).
