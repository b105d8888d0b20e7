//! The embedded local provider: machines from an inventory file, state in a crash-safe embedded database.
