FROM scratch
COPY d* /w/
