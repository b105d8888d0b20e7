//! The cloud controllers, one module per controller.

pub mod node;
