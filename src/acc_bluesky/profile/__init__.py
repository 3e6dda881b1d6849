"""Facility profiles: schema, loader, calibrations and the profile generator. No bluesky imports."""

from .calibration import Calibration, LimitError, Limits
from .loader import Family, Profile, ProfileError, available_profiles, load_profile, profile_search_path
from .schema import FamilySpec, ProfileSpec, Selector

__all__ = [
    "Calibration",
    "Family",
    "FamilySpec",
    "LimitError",
    "Limits",
    "Profile",
    "ProfileError",
    "ProfileSpec",
    "Selector",
    "available_profiles",
    "load_profile",
    "profile_search_path",
]
