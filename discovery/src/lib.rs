//! trellis-discovery: the control plane (work in progress). Nothing is implemented yet.
