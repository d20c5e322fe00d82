//! trellis-examples: the local demo mesh and demo services (work in progress).
