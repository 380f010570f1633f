//! A throwaway local PostgreSQL cluster (initdb into a temp dir as a non-root user, random port), used by `cmk-proxy dev` and the tests.
