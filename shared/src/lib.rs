//! labfleet shared library.
