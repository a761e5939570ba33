//! Image registration to EC2 and OpenStack (filled by the register work).
