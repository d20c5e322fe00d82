//! trellis-ca: the built-in private CA (work in progress; see issue "Workspace foundation and the
//! built-in private CA"). Nothing is implemented yet.
