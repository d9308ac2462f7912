FROM scratch
COPY nope.txt /
