"""Country codes: ISO 3166-1 alpha-2 (and XK), the field that loads them upper-case, the rule
that refuses any other, and that rule as a pattern for the OpenAPI document."""

import pycountry
from marshmallow import ValidationError, fields

# Kosovo has no ISO code yet; Lago accepts its user-assigned XK, and so do we.
COUNTRY_CODES = frozenset(c.alpha_2 for c in pycountry.countries) | {"XK"}

# Letter by letter in either case, so the OpenAPI document states the same rule as known_country.
COUNTRY_PATTERN = (
    "^(" + "|".join(f"[{a}{a.lower()}][{b}{b.lower()}]" for a, b in sorted(COUNTRY_CODES)) + ")"
)


class CountryCode(fields.String):
    """An ISO 3166-1 alpha-2 code in any case, loaded upper-case."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).upper()


def known_country(value: str) -> None:
    """Refuse a code that is not ISO 3166-1 alpha-2 (or XK)."""
    if "\0" in value:
        raise ValidationError("invalid_character")
    if value not in COUNTRY_CODES:
        raise ValidationError("not_a_valid_country_code")
