//! Placeholder: the broker configuration is being written.
