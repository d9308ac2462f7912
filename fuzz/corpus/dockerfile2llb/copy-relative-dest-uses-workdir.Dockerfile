FROM busybox
WORKDIR /app
COPY a.txt .
COPY b.txt rel/
