//! How components speak the CPI: mTLS with hot-reloaded certificates, Unix sockets, deadlines and trace propagation.
