"""`python -m kvlab.student`: the instructors' command; its code is `kvlab.course.student`.

This file exists only so that the command keeps the name the README and book/instructors.md
give it; the student tools themselves are course code (see `kvlab.course`).
"""

from .course.student import main

if __name__ == "__main__":
    raise SystemExit(main())
