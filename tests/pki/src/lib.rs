//! Throwaway certificate authorities and leaf certificates for mTLS tests.
