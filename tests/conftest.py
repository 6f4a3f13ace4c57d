"""Suite-wide settings: this 2-core machine is noisy, so property tests judge outcomes, not speed."""

from hypothesis import HealthCheck, settings

settings.register_profile("streamer", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("streamer")
