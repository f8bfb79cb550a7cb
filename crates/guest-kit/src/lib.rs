//! Host side of the sluice guest kit (work in progress).
