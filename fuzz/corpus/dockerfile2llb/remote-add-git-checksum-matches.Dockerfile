FROM scratch
ADD --checksum={{COMMIT1}} {{GIT}}/repo.git#v1 /r
