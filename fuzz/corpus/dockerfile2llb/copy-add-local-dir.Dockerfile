FROM scratch
ADD dir /add
