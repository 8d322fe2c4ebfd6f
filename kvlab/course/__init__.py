"""The course's own code, apart from the library: what the chapter notebooks use to teach with.

- `checks`: the exercise checks, one module per chapter (`checks.check_alibi_bias(my_alibi_bias)`)
- `bugzoo`: chapter 4's five layer caches with one hidden bug each
- `widgets`: chapter 7's `SamplingExplorer` (ipywidgets)
- `student`: the student edition of the notebooks and bulk grading (`python -m kvlab.student`)

Nothing in the library imports this package, and `import kvlab` loads none of it: it is loaded
only when a notebook asks. The chapters' names still work through `kvlab`'s lazy attributes:
`from kvlab import checks` (or `bugzoo`, `widgets`) gives `kvlab.course.checks`.
"""
