//! sqlparser-based analysis and rewriting of statements that touch protected columns.
