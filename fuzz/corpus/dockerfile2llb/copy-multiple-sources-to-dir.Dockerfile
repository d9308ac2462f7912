FROM scratch
COPY a.txt b.txt /m/
