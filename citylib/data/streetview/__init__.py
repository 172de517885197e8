"""Real street-level images: the Street View Static API, used by ``citylib streetview`` only.

  collect      the stage: seeded points of a city's area -> panoramas -> views on disk, with a
               data-stage manifest (``citylib.streetview.collect.run``)
  static_api   the key (environment or file, never shown), rate limit, retries, request budget
  geosample    seeded points inside a bounding box or a GeoJSON polygon, a set distance apart
"""
